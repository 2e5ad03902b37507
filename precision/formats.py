"""Binary floating-point formats described by one frozen value.

A :class:`FloatFormat` is the single source of truth for a format: every
limit (``max_finite``, ``min_normal``, ``min_subnormal``, ``eps``), the
storage dtype and the special-value layout are *derived* from its fields,
never typed in a second time.

Special-value layouts (``specials``):

``"ieee"``
    The all-ones exponent holds +-inf (mantissa 0) and NaN (mantissa != 0),
    as in fp32, fp16, bf16, fp8_e5m2, fp8_e4m3, fp8_e3m4.
``"fn"``
    Finite only; NaN is the all-ones pattern (``S.1111.111``). The all-ones
    exponent with other mantissas holds ordinary values (fp8_e4m3fn).
``"fnuz"``
    Finite only, no negative zero: NaN is the negative-zero pattern
    ``0x80`` (fp8_e4m3fnuz, fp8_e5m2fnuz, fp8_e4m3b11fnuz).
``"finite"``
    No inf and no NaN at all (fp6_e2m3fn, fp6_e3m2fn, fp4_e2m1fn; ml_dtypes
    calls these ``fn`` too). Overflow saturates in every mode; NaN input is
    an error because it cannot be stored.
``"fnu"``
    Unsigned, exponent-only, no zero: every pattern but all-ones is
    ``2**(field - bias)`` and all-ones is NaN (fp8_e8m0fnu). Requires
    ``mantissa_bits == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Union

import numpy as np

SPECIALS = ("ieee", "fn", "fnuz", "finite", "fnu")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with ``exponent_bits`` and ``mantissa_bits``.

    ``bias`` defaults to the IEEE choice ``2**(exponent_bits-1) - 1``.
    ``specials`` picks where inf/NaN live (see the module docstring).
    ``name`` is only a label; equality ignores it.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int = None  # type: ignore[assignment]  # None asks for the IEEE bias, set in __post_init__
    specials: str = "ieee"
    name: str = field(default="", compare=False)
    # max_finite, min_normal, min_subnormal, eps as floats, set by __post_init__ (not a constructor argument)
    _limits: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if not isinstance(e, (int, np.integer)) or isinstance(e, bool) or not 1 <= e <= 8:
            raise ValueError(f"exponent_bits must be an integer in [1, 8], got {e!r}")
        if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or not 0 <= m <= 23:
            raise ValueError(f"mantissa_bits must be an integer in [0, 23], got {m!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.specials == "fnu" and m != 0:
            raise ValueError("specials='fnu' (exponent-only, unsigned) needs mantissa_bits=0")
        if self.specials == "ieee" and e < 2:
            raise ValueError("specials='ieee' needs exponent_bits >= 2 (one exponent is reserved)")
        if self.specials == "ieee" and m == 0:
            raise ValueError("specials='ieee' needs mantissa_bits >= 1 (inf and NaN differ in the mantissa); "
                             "use specials='fn' or 'finite' for an exponent-only format")
        if self.bits > 32:
            raise ValueError(f"formats wider than 32 bits are not supported (got {self.bits})")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (e - 1)) - 1)
        elif not isinstance(self.bias, (int, np.integer)) or isinstance(self.bias, bool):
            raise ValueError(f"bias must be an integer, got {self.bias!r}")
        if self.exponent_bits == 8 and self.mantissa_bits == 23 and (self.bias != 127 or self.specials != "ieee"):
            raise ValueError("a 32-bit format must be IEEE fp32 (bias 127, specials='ieee')")
        if not self.name:
            object.__setattr__(self, "name", f"e{e}m{m}" + ("" if self.specials == "ieee" else self.specials))
        # Values must be exactly representable in float32 so decode is exact.
        if self.max_exponent > 127 or self.min_exponent - m < -149:
            raise ValueError(
                f"{self.name}: range 2^{self.min_exponent - m}..2^{self.max_exponent} does not fit float32; "
                "choose a bias so that every value is a float32"
            )
        # the float-valued limits, computed once from the exact values: code that torch.compile traces
        # reads them as constants (torch 2.11's Dynamo cannot trace float() of a Fraction)
        two = Fraction(2)
        object.__setattr__(self, "_limits", {
            "max_finite": float(self.exact_value(self.max_finite_code)),
            "min_normal": float(two ** self.min_exponent),
            "min_subnormal": float(two ** (self.min_exponent - (m if self.has_subnormals else 0))),
            "eps": float(two ** -m)})

    # -- layout --------------------------------------------------------------
    @property
    def signed(self) -> bool:
        """Whether the format has a sign bit (all but ``fnu``)."""
        return self.specials != "fnu"

    @property
    def bits(self) -> int:
        """Total width in bits (sign + exponent + mantissa)."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def storage_dtype(self) -> np.dtype:
        """Unsigned integer dtype holding one code: uint8, uint16 or uint32."""
        return np.dtype(np.uint8 if self.bits <= 8 else np.uint16 if self.bits <= 16 else np.uint32)

    @property
    def sign_mask(self) -> int:
        return (1 << (self.bits - 1)) if self.signed else 0

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials != "finite"

    @property
    def has_negative_zero(self) -> bool:
        return self.specials in ("ieee", "fn", "finite")

    @property
    def has_subnormals(self) -> bool:
        return self.specials != "fnu" and self.mantissa_bits > 0

    # -- special codes -------------------------------------------------------
    @property
    def inf_code(self) -> int | None:
        """Code of +inf, or None when the format has no infinity."""
        if not self.has_inf:
            return None
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits

    @property
    def nan_code(self) -> int | None:
        """Canonical (quiet, positive) NaN code, or None when there is none."""
        e, m = self.exponent_bits, self.mantissa_bits
        if self.specials == "ieee":
            return (((1 << e) - 1) << m) | (1 << (m - 1) if m else 0)
        if self.specials == "fn":
            return (1 << (e + m)) - 1
        if self.specials == "fnuz":
            return 1 << (e + m)
        if self.specials == "fnu":
            return (1 << e) - 1
        return None

    @property
    def max_finite_code(self) -> int:
        """Code of the largest finite positive value."""
        e, m = self.exponent_bits, self.mantissa_bits
        if self.specials == "ieee":
            return (((1 << e) - 2) << m) | ((1 << m) - 1)
        if self.specials in ("fn", "fnu"):
            return (1 << (e + m)) - 2
        return (1 << (e + m)) - 1  # fnuz, finite

    # -- exponents and limits ------------------------------------------------
    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal value."""
        return -self.bias if self.specials == "fnu" else 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value."""
        return (self.max_finite_code >> self.mantissa_bits) - self.bias

    @property
    def max_finite(self) -> float:
        """Largest finite value."""
        return self._limits["max_finite"]

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**min_exponent``."""
        return self._limits["min_normal"]

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` without subnormals)."""
        return self._limits["min_subnormal"]

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger value, ``2**-mantissa_bits``."""
        return self._limits["eps"]

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def num_finite(self) -> int:
        """Number of bit patterns that decode to a finite value (both zeros count)."""
        n = 1 << self.bits
        if self.specials == "ieee":
            return n - 2 * (1 << self.mantissa_bits)
        if self.specials == "fn":
            return n - 2
        if self.specials in ("fnuz", "fnu"):
            return n - 1
        return n

    # -- exact values --------------------------------------------------------
    def exact_value(self, code: int) -> Fraction | float:
        """The exact value of one code: a Fraction, or float inf/nan."""
        code = int(code)
        if not 0 <= code < self.num_codes:
            raise ValueError(f"code {code} out of range for {self.name} ({self.bits} bits)")
        m = self.mantissa_bits
        if self.nan_code is not None and (code & ~self.sign_mask) == self.nan_code and self.specials != "fnuz":
            return float("nan")
        if self.specials == "fnuz" and code == self.nan_code:
            return float("nan")
        if self.specials == "ieee" and (code & ~self.sign_mask) >> m == (1 << self.exponent_bits) - 1:
            mag = code & ~self.sign_mask
            if mag & ((1 << m) - 1):
                return float("nan")
            return float("-inf") if code & self.sign_mask else float("inf")
        neg = bool(code & self.sign_mask)
        mag = code & ~self.sign_mask
        field_e, mant = mag >> m, mag & ((1 << m) - 1)
        if self.specials == "fnu":
            value = Fraction(2) ** (field_e - self.bias)
        elif field_e == 0:
            value = Fraction(mant, 1 << m) * Fraction(2) ** (1 - self.bias)
        else:
            value = (1 + Fraction(mant, 1 << m)) * Fraction(2) ** (field_e - self.bias)
        return -value if neg else value

    # -- twins in other libraries -----------------------------------------------
    @property
    def _twin(self) -> tuple[str, str | None] | None:
        return _TWINS.get((self.exponent_bits, self.mantissa_bits, self.bias, self.specials))

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The numpy (or ml_dtypes) dtype with exactly this format's values, or None."""
        t = self._twin
        if t is None:
            return None
        import ml_dtypes

        found = getattr(np, t[0], None) if t[0] in ("float32", "float16") else getattr(ml_dtypes, t[0], None)
        return None if found is None else np.dtype(found)

    @property
    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` with exactly this format's values, or None (also without torch)."""
        t = self._twin
        try:
            import torch
        except ImportError:  # pragma: no cover
            return None
        return None if t is None else getattr(torch, t[0], None)

    @property
    def safetensors_dtype(self) -> str | None:
        """The safetensors dtype name of this format (``"F32"``, ``"BF16"``, ``"F8_E4M3"`` ...), or None."""
        t = self._twin
        return None if t is None else t[1]

    def __str__(self) -> str:
        return self.name


FormatLike = Union[FloatFormat, str]

# (exponent bits, mantissa bits, bias, specials) -> (dtype name in numpy/ml_dtypes and torch, safetensors name)
_TWINS: dict[tuple[int, int, int | None, str], tuple[str, str | None]] = {
    (8, 23, 127, "ieee"): ("float32", "F32"),
    (5, 10, 15, "ieee"): ("float16", "F16"),
    (8, 7, 127, "ieee"): ("bfloat16", "BF16"),
    (4, 3, 7, "fn"): ("float8_e4m3fn", "F8_E4M3"),
    (5, 2, 15, "ieee"): ("float8_e5m2", "F8_E5M2"),
    (4, 3, 8, "fnuz"): ("float8_e4m3fnuz", None),
    (5, 2, 16, "fnuz"): ("float8_e5m2fnuz", None),
    (4, 3, 11, "fnuz"): ("float8_e4m3b11fnuz", None),
    (3, 4, 3, "ieee"): ("float8_e3m4", None),
    (4, 3, 7, "ieee"): ("float8_e4m3", None),
    (8, 0, 127, "fnu"): ("float8_e8m0fnu", None),
    (2, 3, 1, "finite"): ("float6_e2m3fn", None),
    (3, 2, 3, "finite"): ("float6_e3m2fn", None),
    (2, 1, 1, "finite"): ("float4_e2m1fn", None),
}

_REGISTRY: dict[str, FloatFormat] = {}


def register(fmt: FloatFormat) -> FloatFormat:
    """Add a named format to the registry (names are unique)."""
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] != fmt:
        raise ValueError(f"a different format is already registered as {fmt.name!r}")
    _REGISTRY[fmt.name] = fmt
    return fmt


fp32 = register(FloatFormat(8, 23, name="fp32"))
fp16 = register(FloatFormat(5, 10, name="fp16"))
bf16 = register(FloatFormat(8, 7, name="bf16"))
fp8_e4m3fn = register(FloatFormat(4, 3, specials="fn", name="fp8_e4m3fn"))
fp8_e5m2 = register(FloatFormat(5, 2, name="fp8_e5m2"))
fp8_e4m3fnuz = register(FloatFormat(4, 3, bias=8, specials="fnuz", name="fp8_e4m3fnuz"))
fp8_e5m2fnuz = register(FloatFormat(5, 2, bias=16, specials="fnuz", name="fp8_e5m2fnuz"))
fp8_e4m3b11fnuz = register(FloatFormat(4, 3, bias=11, specials="fnuz", name="fp8_e4m3b11fnuz"))
fp8_e3m4 = register(FloatFormat(3, 4, name="fp8_e3m4"))
fp8_e4m3 = register(FloatFormat(4, 3, name="fp8_e4m3"))
fp8_e8m0fnu = register(FloatFormat(8, 0, specials="fnu", name="fp8_e8m0fnu"))
fp6_e2m3fn = register(FloatFormat(2, 3, specials="finite", name="fp6_e2m3fn"))
fp6_e3m2fn = register(FloatFormat(3, 2, specials="finite", name="fp6_e3m2fn"))
fp4_e2m1fn = register(FloatFormat(2, 1, specials="finite", name="fp4_e2m1fn"))


def known_formats() -> tuple[str, ...]:
    """Names of every registered format."""
    return tuple(_REGISTRY)


def get_format(fmt: FormatLike) -> FloatFormat:
    """Return the FloatFormat for a registered name (or the format itself)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, str):
        try:
            return _REGISTRY[fmt]
        except KeyError:
            raise ValueError(f"unknown float format {fmt!r}; known formats: {', '.join(_REGISTRY)}") from None
    raise TypeError(f"fmt must be a FloatFormat or a format name, got {type(fmt).__name__}")
