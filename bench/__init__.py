"""lowbit.bench: command-line programs (quantize, codecs) and the bundled real model."""
