"""lowbit.bench: command-line programs and benchmarks.

``python -m bench.quantize`` compresses checkpoints through
:func:`lowbit.compress_checkpoint`; the other modules measure speed and
accuracy against peer libraries.
"""
