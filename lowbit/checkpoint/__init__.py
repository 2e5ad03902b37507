"""lowbit.checkpoint: compress whole checkpoints and read them back.

* :func:`compress_checkpoint` (source, output, method) -> Report
* :func:`load` (path) -> ``{name: tensor}``
* :class:`Chain`: an optional structure method then an optional value method
* :class:`Checkpoint` / :class:`SafetensorsWriter`: the safe streaming reader and atomic writer
* :class:`CompressedTensors`, :func:`load_quantized`, :func:`save_quantized`: the compressed-tensors
  model directories that transformers and vLLM load, and lowbit's quantized models built from them
* ``format="gguf"`` and ``format="onnx-qdq"``: GGUF files and ONNX ``DequantizeLinear`` weights or graphs
"""

from .chain import SCHEME_VERSION, Chain, Compressed, NotApplied, compress_tensor, restore, step_kind
from .io import Checkpoint, CheckpointError, SafetensorsFile, SafetensorsWriter
from .compressed_tensors import CompressedTensors, load_quantized, save_quantized
from .pipeline import compress_checkpoint, load

__all__ = ["compress_checkpoint", "load", "Chain", "step_kind", "Compressed", "NotApplied", "compress_tensor",
           "restore", "SCHEME_VERSION", "CompressedTensors", "load_quantized", "save_quantized",
           "Checkpoint", "CheckpointError", "SafetensorsFile", "SafetensorsWriter"]
