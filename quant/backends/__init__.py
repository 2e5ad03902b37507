"""Other libraries that carry out a lowbit quantization request."""
