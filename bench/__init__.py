"""lowbit.bench: command-line programs and checkpoint I/O.

``python -m bench.quantize`` compresses checkpoints; :func:`load` reads a
checkpoint it wrote back as dense tensors.
"""

from .load import load

__all__ = ["load"]
