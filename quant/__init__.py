"""lowbit.quant: integer quantization built on one QuantSpec and one quantize/dequantize.

Spec: :class:`QuantSpec` with :class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup`.
Params: :func:`calibrate` -> :class:`QParams`.
Ops: :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`.
Quantizers: :class:`StaticQuantizer`, :class:`DynamicQuantizer`.
Training: :class:`FakeQuantize`, :func:`prepare_qat`, :func:`convert`.
Models: :func:`ptq` with ``backend="native"`` or ``"torch.ao"``.
Attention: :func:`int8_attention` (both products on int8 codes; ``ptq(attention=True)``).
"""

from .calibrate import METHODS, calibrate, qparams_from_range
from .dynamic import DynamicQuantizer, Quantized
from .quantize import QParams, dequantize, fake_quantize, quantize
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .static import StaticQuantizer
from .qat import FakeQuantize, convert, prepare_qat
from .ptq import ptq
from .modules import QuantizedLinear
from .attention import int8_attention

__all__ = [
    "QuantSpec", "PerTensor", "PerChannel", "PerGroup", "QParams", "calibrate", "qparams_from_range", "METHODS",
    "quantize", "dequantize", "fake_quantize", "StaticQuantizer", "DynamicQuantizer", "Quantized",
    "FakeQuantize", "prepare_qat", "convert", "ptq", "QuantizedLinear", "int8_attention",
]
