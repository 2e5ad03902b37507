"""lowbit.quant: integer quantization built on one QuantSpec and one quantize/dequantize.

Spec: :class:`QuantSpec` with :class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup`.
Params: :func:`calibrate` -> :class:`QParams`.
Ops: :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`.
Quantizers: :class:`StaticQuantizer`, :class:`DynamicQuantizer`.
Training: :class:`FakeQuantize`, :func:`prepare_qat`, :func:`convert`, :func:`freeze_observers`,
:func:`enable_observers`, :func:`enable_fake_quant`.
Models: :func:`ptq` (model, :class:`PTQConfig`, calibration data), presets ``PTQConfig.W8``,
``W8A8_DYNAMIC``, ``W8A8_FAST``, ``W4_G128``; the activation specs :data:`TOKEN_SPEC` and
:data:`TOKEN_SPEC_FULL` and :data:`TOKEN_SPEC_AFFINE` (compressed-tensors' W8A8, symmetric and
asymmetric); :class:`Float8Linear` for fp8 weights, :class:`BlockLinear` for MX and NVFP4 weights.
Beyond round to nearest: :class:`GPTQ` and :class:`AWQ` (``PTQConfig(gptq=..., awq=...)``), the OBS
sweep :func:`~quant.gptq.obs_sweep` that SparseGPT shares, and :func:`~quant.solve.solve_layers`,
which applies them layer by layer in forward order.
Attention: :func:`int8_attention` (both products on int8 codes; ``PTQConfig(int8_attention=True)``).
Checkpoints: :class:`~quant.storage.IntQuant`, the integer method of ``lowbit.checkpoint``.
"""

from .calibrate import METHODS, calibrate, qparams_from_range
from .dynamic import DynamicQuantizer, Quantized
from .quantize import QParams, dequantize, fake_quantize, quantize
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .static import StaticQuantizer
from .qat import FakeQuantize, convert, enable_fake_quant, enable_observers, freeze_observers, prepare_qat
from .ptq import PTQConfig, ptq
from .modules import TOKEN_SPEC, TOKEN_SPEC_AFFINE, TOKEN_SPEC_FULL, BlockLinear, Float8Linear, QuantizedLinear
from .attention import int8_attention
from .storage import IntQuant
from .gptq import GPTQ
from .awq import AWQ

__all__ = [
    "QuantSpec", "PerTensor", "PerChannel", "PerGroup", "QParams", "calibrate", "qparams_from_range", "METHODS",
    "quantize", "dequantize", "fake_quantize", "StaticQuantizer", "DynamicQuantizer", "Quantized",
    "FakeQuantize", "prepare_qat", "convert", "freeze_observers", "enable_observers", "enable_fake_quant",
    "ptq", "PTQConfig", "QuantizedLinear", "Float8Linear", "BlockLinear", "TOKEN_SPEC", "TOKEN_SPEC_FULL",
    "TOKEN_SPEC_AFFINE", "int8_attention", "IntQuant",
    "GPTQ", "AWQ",
]
