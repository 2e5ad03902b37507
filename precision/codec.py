"""Encode real numbers into the bit patterns of any :class:`FloatFormat` and back.

One algorithm (:func:`_encode_exact`) rounds a value given as
``(-1)**sign * M * 2**E`` (integer significand ``M``) to the nearest code of
a format. Every input kind is decomposed into that form exactly, so float64
and integer inputs are rounded in one step (no double rounding through
float32). For float32 input there are fast paths, each tested against the
exact algorithm: an encode table for 8-bit formats (filled by it), integer
rounding of the float32 pattern for wider ones, and for large fp16/bf16
arrays torch's conversion kernel (hardware F16C where present), used only
while a probe of the hard cases shows it rounds exactly as lowbit does, and
with NaN redone by lowbit's rule. The table lookups (8-bit encode, decode of
every format but fp16) and the bf16 decode shift run as one C pass where
lowbit's C kernels are built (:mod:`precision._native`; same tables, same
index, same results), else as chunked numpy passes.

Rounding modes
    ``"nearest_even"`` (default): nearest representable value, ties to the
    even significand. ``"nearest_away"``: nearest representable value, ties
    away from zero (the OCP MX reference's default rounding).
    ``"toward_zero"``: truncate the magnitude (as IEEE 754 has it, never an overflow: a finite value beyond
    the largest finite one gives the largest).
    ``"stochastic"``: round up with probability equal to the distance from the
    lower neighbour over the gap; needs ``seed`` (int) or ``generator``
    (``numpy.random.Generator``) and is reproducible with it.

Subnormal results
    ``"keep"`` (default): a result below the format's smallest normal
    magnitude is its subnormal code. ``"flush"``: a result that rounds to a
    subnormal code becomes zero of the same sign (+0 in fnuz formats, which
    have no -0); a value that rounds up to the smallest normal stays normal.
    Formats without subnormals (fp8_e8m0fnu) are unaffected.

Overflow modes
    ``"ieee"`` (default, as ml_dtypes): a magnitude that rounds beyond
    ``max_finite`` becomes +-inf where the format has inf, NaN where it has
    only NaN (fn, fnuz, fnu), and +-max_finite where it has neither (the
    ``finite`` formats fp6/fp4). ``"saturate"`` (as torch for fp8_e4m3fn and
    OCP's saturating conversion): finite overflow and +-inf clamp to
    +-max_finite.

NaN
    NaN becomes the format's canonical quiet NaN, keeping its sign where the
    format has a sign bit and a signed NaN (ieee, fn); fnuz and fnu have a
    single NaN. Formats with no NaN (fp6/fp4) raise ValueError on NaN input.
    Note torch picks other NaN patterns (0x7F for e5m2, 0xFFFF for bf16).

Zero
    fnuz formats have no -0: -0.0 and negative values that round to zero
    encode as +0. fp8_e8m0fnu has no zero and no negatives: 0 and negative
    inputs give NaN, positive values below its smallest value round to it
    (as ml_dtypes).
"""

from __future__ import annotations

import math
import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .arrays import SMALL_FLOAT_DTYPES, as_numpy, contiguous, is_torch, like, real_array, torch
from ._native import Library, threads
from .formats import FloatFormat, FormatLike, get_format

ROUNDING_MODES = ("nearest_even", "nearest_away", "toward_zero", "stochastic")
OVERFLOW_MODES = ("ieee", "saturate")
SUBNORMAL_MODES = ("keep", "flush")

_CHUNK = 1 << 17  # elements per block: every temporary stays in L2 cache, calls stay few

_FINITE, _INF, _NAN = 0, 1, 2


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lowbit_encode_f32_byte.argtypes = [p, i64, p, p, i32]
    lib.lowbit_encode_f32_byte.restype = i64
    lib.lowbit_encode_f32_byte_scaled.argtypes = [p, i64, i64, p, p, p, i32]
    lib.lowbit_encode_f32_byte_scaled.restype = None
    lib.lowbit_encode_f32_ieee8.argtypes = [p, i64, i32, i32, i32, ctypes.c_uint32, i32, i32, p, i32]
    lib.lowbit_encode_f32_ieee8.restype = None
    lib.lowbit_decode_table.argtypes = [p, i32, i64, p, i64, p, i32]
    lib.lowbit_decode_table.restype = None
    lib.lowbit_decode_top16.argtypes = [p, i64, i32, p, i32]
    lib.lowbit_decode_top16.restype = None
    lib.lowbit_row_absmax.argtypes = [p, i64, i64, p, i32]
    lib.lowbit_row_absmax.restype = i32


_KERNELS = Library(Path(__file__).with_name("_kernels") / "codec_kernels.c", _bind, fallback="numpy")


# ---------------------------------------------------------------- validation
def check_modes(rounding: str, overflow: str, subnormals: str = "keep") -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if subnormals not in SUBNORMAL_MODES:
        raise ValueError(f"subnormals must be one of {SUBNORMAL_MODES}, got {subnormals!r}")


def _rng(rounding: str, seed: int | None, generator: np.random.Generator | None) -> np.random.Generator | None:
    if rounding != "stochastic":
        if seed is not None or generator is not None:
            raise ValueError("seed/generator only apply to rounding='stochastic'")
        return None
    if generator is not None:
        if not isinstance(generator, np.random.Generator):
            raise TypeError("generator must be a numpy.random.Generator")
        return generator
    if seed is None:
        raise ValueError("rounding='stochastic' needs seed=<int> or generator=<numpy.random.Generator> to be reproducible")
    return np.random.default_rng(seed)


# --------------------------------------------------------- exact decomposition
def _decompose(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split values into (negative, M, E, kind) with |x| = M * 2**E exactly."""
    if a.dtype == np.float32:
        b = a.view(np.uint32)
        neg = (b >> 31).astype(bool)
        ef = ((b >> 23) & 0xFF).astype(np.int64)
        frac = (b & 0x7FFFFF).astype(np.uint64)
        M = np.where(ef == 0, frac, frac | np.uint64(1 << 23))
        E = np.where(ef == 0, -149, ef - 150)
        kind = np.where(ef == 0xFF, np.where(frac == 0, _INF, _NAN), _FINITE)
    elif a.dtype == np.float64:
        b = a.view(np.uint64)
        neg = (b >> np.uint64(63)).astype(bool)
        ef = ((b >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
        frac = b & np.uint64((1 << 52) - 1)
        M = np.where(ef == 0, frac, frac | np.uint64(1 << 52))
        E = np.where(ef == 0, -1074, ef - 1075)
        kind = np.where(ef == 0x7FF, np.where(frac == 0, _INF, _NAN), _FINITE)
    elif a.dtype.kind == "u":
        M = a.astype(np.uint64)
        neg = np.zeros(a.shape, bool)
        E = np.zeros(a.shape, np.int64)
        kind = np.zeros(a.shape, np.int64)
    else:  # signed integers: |int64 min| = 2**63 still fits uint64
        s = a.astype(np.int64)
        neg = s < 0
        u = s.view(np.uint64)
        M = np.where(neg, ~u + np.uint64(1), u)
        E = np.zeros(a.shape, np.int64)
        kind = np.zeros(a.shape, np.int64)
    return neg, M, E, kind


def _bit_length(M: np.ndarray) -> np.ndarray:
    """Number of significant bits of each uint64 (0 for 0)."""
    _, ex = np.frexp(M.astype(np.float64))  # may round up for M > 2**53: corrected below
    bl = ex.astype(np.int64)
    over = (bl > 0) & ((M >> np.clip(bl - 1, 0, 63).astype(np.uint64)) == 0)
    return bl - over


# ------------------------------------------------------------ the algorithm
def _encode_exact(neg, M, E, kind, fmt: FloatFormat, rounding: str, overflow: str, rng) -> np.ndarray:
    """Round |x| = M * 2**E to ``fmt`` and return codes as int64. The reference algorithm."""
    m = fmt.mantissa_bits
    emin = fmt.min_exponent
    qmin = emin - m  # exponent of the smallest quantum (the subnormal spacing)
    nonzero = M != 0
    e = np.where(nonzero, E + _bit_length(M) - 1, emin)  # floor(log2 |x|)
    qexp = np.maximum(e, emin) - m  # exponent of the quantum at |x|
    shift = qexp - E
    left = shift <= 0
    s = np.clip(shift, 1, 63).astype(np.uint64)
    r_left = M << np.clip(-shift, 0, 63).astype(np.uint64)  # exact: < 2**(m+1) where used
    r = M >> s
    rem = M & ((np.uint64(1) << s) - np.uint64(1))
    if rounding == "nearest_even":
        half = np.uint64(1) << (s - np.uint64(1))
        up = (rem > half) | ((rem == half) & ((r & np.uint64(1)) == 1))
    elif rounding == "nearest_away":
        up = rem >= np.uint64(1) << (s - np.uint64(1))
    elif rounding == "toward_zero":
        up = np.zeros(M.shape, bool)
    else:  # stochastic: P(up) = rem / 2**shift, computed with the true shift
        up = rng.random(M.shape) < np.ldexp(rem.astype(np.float64), -np.maximum(shift, 1))
    r = np.where(left, r_left, r + up).astype(np.int64)
    code = r + ((qexp - qmin) << m)
    if fmt.specials == "fnu":  # field 0 is a normal value 2**emin: no subnormals, no zero
        code = np.maximum(code - 1, 0)
    maxc = fmt.max_finite_code
    if rounding == "toward_zero":  # IEEE 754: rounding toward zero never overflows; a finite value beyond is max
        code = np.where((code > maxc) & (kind == _FINITE), maxc, code)
    over = (code > maxc) & (kind == _FINITE)
    # overflow and infinite input go to the same code: max finite (saturate, or a finite-only
    # format), else inf, else NaN (a format with neither inf nor NaN is finite-only)
    sat = fmt.specials == "finite" or overflow == "saturate"
    over_code = maxc if sat else (fmt.inf_code if fmt.has_inf else fmt.nan_code)
    assert over_code is not None
    code = np.where(over | (kind == _INF), over_code, code)
    if fmt.nan_code is not None:
        code = np.where(kind == _NAN, fmt.nan_code, code)
    elif np.any(kind == _NAN):
        raise ValueError(f"input contains NaN, which {fmt.name} cannot represent (it has no NaN encoding)")
    if fmt.specials == "fnu":  # zero and negative inputs have no encoding
        assert fmt.nan_code is not None
        code = np.where((~nonzero & (kind == _FINITE)) | neg, fmt.nan_code, code)
    elif fmt.specials == "fnuz":  # one zero, one NaN: neither carries a sign
        code = np.where(neg & (code != 0) & (code != fmt.nan_code), code | fmt.sign_mask, code)
    else:
        code = np.where(neg, code | fmt.sign_mask, code)
    return code


# ------------------------------------------------------- float32 fast paths
_POOL: ThreadPoolExecutor | None = None
_PARALLEL_MIN = 1 << 20  # below this many elements threads cost more than they save


def _parallel(part: Callable[[int, int], None], n: int, out_itemsize: int) -> None:
    """Run ``part(lo, hi)`` over [0, n) across the cores (numpy releases the GIL in its loops).

    Work is dealt out in blocks whose output is one 2 MiB huge page, round-robin
    over the workers: the first write to a fresh output faults its pages in, and
    two threads faulting neighbouring blocks proceed in parallel, where two
    contiguous halves fault in bursts that collide.
    """
    global _POOL
    workers = min(threads(), 8)  # the thread budget of the caller (see precision._native.thread_budget)
    if n < _PARALLEL_MIN or workers == 1:
        part(0, n)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowbit-codec")
    block = max(_CHUNK, (2 << 20) // out_itemsize // _CHUNK * _CHUNK)

    def deal(k: int) -> None:
        for lo in range(k * block, n, workers * block):
            part(lo, min(lo + block, n))

    for f in [_POOL.submit(deal, k) for k in range(workers)]:
        f.result()


def _chunks(b: np.ndarray, lo: int, hi: int, *scratch_dtypes):
    """Yield (start, b[start:start+chunk], scratch arrays of the chunk's length) over [lo, hi).
    Scratch is allocated once per call, so the loop allocates nothing."""
    scratch = [np.empty(_CHUNK, d) for d in scratch_dtypes]
    for i in range(lo, hi, _CHUNK):
        c = b[i:min(i + _CHUNK, hi)]
        yield i, c, [x[:c.size] for x in scratch]


_TABLES: dict[tuple, np.ndarray] = {}


def _byte_table(fmt: FloatFormat, rounding: str, overflow: str) -> np.ndarray:
    """Encode table for float32 -> <=8-bit formats with <= 6 mantissa bits.

    Index ``(sign << 16) | (2 * (bits >> 16 & 0x7FFF) + sticky)``: for such a
    format the rounding bit sits at or above bit 16 of the float32 pattern, so
    the top 16 bits plus "any lower bit set" decide the result. The table is
    filled by the exact algorithm from one representative per index.
    """
    key = (fmt, rounding, overflow)
    t = _TABLES.get(key)
    if t is None:
        i = np.arange(1 << 17, dtype=np.uint32)
        rep = ((i >> 16) << 31) | (((i & 0xFFFF) >> 1) << 16) | (i & 1)
        neg, M, E, kind = _decompose(rep.view(np.float32))
        kind = kind.copy()
        nan = kind == _NAN
        if fmt.nan_code is None:  # mark NaN with an impossible code; checked after lookup
            kind[nan] = _FINITE
        codes = _encode_exact(neg, M, E, kind, fmt, rounding, overflow, None)
        if fmt.nan_code is None:
            codes[nan] = 0xFF
        # 3 bytes of padding: the C kernel gathers a dword at each entry's byte offset
        t = np.concatenate([codes.astype(np.uint8), np.zeros(3, np.uint8)])
        _TABLES[key] = t
    return t


def _encode_f32_ieee8(a: np.ndarray, fmt: FloatFormat) -> np.ndarray | None:
    """Nearest-even, ieee-overflow encode of float32 to a signed IEEE-like format of 8 bits or fewer
    by bit arithmetic in C (see codec_kernels.c); None without the C pass (the table path runs)."""
    lib = _KERNELS.get()
    if lib is None:
        return None
    m, emax = fmt.mantissa_bits, fmt.max_exponent
    # the smallest magnitude that rounds to inf: halfway above the largest finite value (a tie goes up,
    # since the largest finite value has an odd mantissa)
    threshold = int(np.float32(fmt.max_finite + 2.0 ** (emax - m - 1)).view(np.uint32))
    b = a.reshape(-1).view(np.uint32)
    out = np.empty(b.shape, np.uint8)
    lib.lowbit_encode_f32_ieee8(b.ctypes.data, b.size, fmt.bits, m, fmt.bias, threshold, fmt.inf_code, fmt.nan_code,
                                out.ctypes.data, threads())
    return out.reshape(a.shape)


def _encode_f32_byte(a: np.ndarray, fmt: FloatFormat, rounding: str, overflow: str) -> np.ndarray:
    table = _byte_table(fmt, rounding, overflow)
    b = a.reshape(-1).view(np.uint32)
    out = np.empty(b.shape, np.uint8)
    lib = _KERNELS.get()
    if lib is not None:
        marked = lib.lowbit_encode_f32_byte(b.ctypes.data, b.size, table.ctypes.data, out.ctypes.data, threads())
    else:
        def part(lo: int, hi: int) -> None:
            for i, c, (m_, x_, t_) in _chunks(b, lo, hi, np.uint32, np.intp, np.intp):
                k = c.size
                np.bitwise_and(c, 0x7FFFFFFF, out=m_)
                np.right_shift(m_, 16, out=x_, casting="unsafe")
                np.add(m_, 0xFFFF, out=m_)
                np.right_shift(m_, 16, out=t_, casting="unsafe")
                np.add(x_, t_, out=x_)
                np.right_shift(c, 15, out=t_, casting="unsafe")
                np.bitwise_and(t_, 0x10000, out=t_)
                np.add(x_, t_, out=x_)
                np.take(table, x_, out=out[i:i + k])

        _parallel(part, b.size, 1)
        marked = int(np.count_nonzero(out == 0xFF)) if fmt.nan_code is None else 0
    # 0xFF marks NaN, but in an 8-bit finite-only format it is also a real code (the most negative
    # value), so a marked output is only an error when the input really holds NaN
    if fmt.nan_code is None and marked and np.isnan(a).any():
        raise ValueError(f"input contains NaN, which {fmt.name} cannot represent (it has no NaN encoding)")
    return out.reshape(a.shape)


def row_absmax(a: np.ndarray, rows: int) -> np.ndarray | None:
    """``max(max(row), -min(row))`` of each row of the float32 array ``a`` viewed as (rows, -1), in one
    C pass (the values the two numpy reductions give; a zero keeps no sign); None where that pass does
    not apply, and None too when ``a`` holds NaN or inf (the caller's checks then raise their error)."""
    lib = _KERNELS.get()
    if lib is None or a.dtype != np.float32 or not a.flags.c_contiguous or a.size == 0 or rows < 1 or a.size % rows:
        return None
    out = np.empty(rows, np.float32)
    return out if lib.lowbit_row_absmax(a.ctypes.data, rows, a.size // rows, out.ctypes.data, threads()) == 1 else None


def encode_row_scaled(a: np.ndarray, scale: np.ndarray, fmt: FloatFormat, rounding: str, overflow: str,
                      subnormals: str) -> np.ndarray | None:
    """``encode(a / scale, ...)`` for finite float32 ``a`` and float32 ``scale`` of one value per row of
    ``a`` viewed as (len(scale), -1) (per-tensor: one value), in one C pass that divides as it encodes
    (the same IEEE float32 division, so the same codes, with no quotient array); None where that pass
    does not apply (the caller then divides and encodes)."""
    lib = _KERNELS.get()
    if lib is None or a.dtype != np.float32 or scale.dtype != np.float32 or not a.flags.c_contiguous \
            or a.size == 0 or a.size % max(scale.size, 1) or not (fmt.bits <= 8 and fmt.mantissa_bits <= 6) \
            or rounding == "stochastic":
        return None
    check_modes(rounding, overflow, subnormals)
    table = _byte_table(fmt, rounding, overflow)
    rows = scale.size
    s = np.ascontiguousarray(scale.reshape(-1))
    out = np.empty(a.shape, np.uint8)
    lib.lowbit_encode_f32_byte_scaled(a.ctypes.data, rows, a.size // rows, s.ctypes.data, table.ctypes.data,
                                      out.ctypes.data, threads())
    return flush_subnormals(out, fmt) if subnormals == "flush" else out


def _encode_f32_top(a: np.ndarray, fmt: FloatFormat, rounding: str) -> np.ndarray:
    """float32 -> formats that are the top bits of float32 (bf16: 8 exponent bits, bias 127, ieee).

    Rounding the pattern at bit ``23 - m`` is the whole algorithm: subnormals
    line up and overflow carries into the inf pattern. Only NaN needs care
    (a signalling NaN would round into inf), so NaN elements take the exact path.
    """
    sh = 23 - fmt.mantissa_bits
    b = a.reshape(-1).view(np.uint32)
    flat = a.reshape(-1)
    out = np.empty(b.shape, fmt.storage_dtype)

    def part(lo: int, hi: int) -> None:
        for i, c, (t,) in _chunks(b, lo, hi, np.uint32):
            k = c.size
            if rounding == "nearest_even":
                np.right_shift(c, sh, out=t)
                np.bitwise_and(t, 1, out=t)
                np.add(t, (1 << (sh - 1)) - 1, out=t)
                np.add(t, c, out=t)
            elif rounding == "nearest_away":  # half an ulp up, then truncate: a tie carries away from zero
                np.add(c, 1 << (sh - 1), out=t)
            else:
                t[...] = c
            np.right_shift(t, sh, out=t)
            out[i:i + k] = t  # a plain narrowing copy: faster than a casting shift
            f = flat[i:i + k]
            if np.isnan(f.max()):  # one reduction pass: max propagates NaN
                j = np.flatnonzero(np.isnan(f))
                out[i + j] = _encode_exact(*_decompose(f[j]), fmt, rounding, "ieee", None)

    _parallel(part, b.size, out.itemsize)
    return out.reshape(a.shape)


def _encode_f32_wide(a: np.ndarray, fmt: FloatFormat, rounding: str, overflow: str) -> np.ndarray:
    """float32 -> formats with 7..22 mantissa bits, by integer rounding of the pattern.

    Inside the target's normal range, rounding the float32 pattern at bit
    ``23 - m`` and re-biasing the exponent is exact (a carry moves into the
    exponent as it should). Blocks holding anything else (zero, subnormal
    results, overflow, inf, NaN) are fixed up: subnormal results by scaling
    by a power of two (exact) and rounding as floats (``rint`` is ties-to-even),
    the rest by the exact algorithm on just those elements.
    """
    m = fmt.mantissa_bits
    sh = 23 - m
    rebias = (127 - fmt.bias) << m
    half_m1 = (1 << (sh - 1)) - 1
    lo_bits = int(np.float32(fmt.min_normal).view(np.uint32))  # smallest regular magnitude pattern
    hi_bits = int(np.float32(fmt.max_finite).view(np.uint32))  # largest; above it may overflow
    sub_scale = 2.0 ** (m - fmt.min_exponent)
    sign_shift = 32 - fmt.bits
    b = a.reshape(-1).view(np.uint32)
    flat = a.reshape(-1)
    out = np.empty(b.shape, fmt.storage_dtype)

    def part(lo: int, hi: int) -> None:
        for i, c, (m_, r_, t_) in _chunks(b, lo, hi, np.uint32, np.uint32, np.uint32):
            k = c.size
            np.bitwise_and(c, 0x7FFFFFFF, out=m_)
            if rounding == "nearest_even":
                np.right_shift(m_, sh, out=r_)
                np.bitwise_and(r_, 1, out=r_)
                np.add(r_, half_m1, out=r_)
                np.add(r_, m_, out=r_)
                np.right_shift(r_, sh, out=r_)
            elif rounding == "nearest_away":
                np.add(m_, half_m1 + 1, out=r_)
                np.right_shift(r_, sh, out=r_)
            else:
                np.right_shift(m_, sh, out=r_)
            np.subtract(r_, rebias, out=r_)
            np.right_shift(c, sign_shift, out=t_)
            np.bitwise_and(t_, fmt.sign_mask, out=t_)
            np.bitwise_or(r_, t_, out=r_)
            if m_.min() < lo_bits:  # zero and subnormal results: scale up exactly, round as floats
                j = np.flatnonzero(m_ < lo_bits)
                fa = np.abs(flat[i + j]).astype(np.float64) * sub_scale  # float64: bf16's 2**133 overflows float32
                # fa is |x| in units of the smallest subnormal: below 2**25, so fa + 0.5 is exact
                sub = (np.rint(fa) if rounding == "nearest_even" else np.floor(fa + 0.5) if rounding == "nearest_away"
                       else np.trunc(fa)).astype(np.uint32)
                r_[j] = sub | t_[j]
            if m_.max() > hi_bits:  # overflow, inf, NaN
                j = np.flatnonzero(m_ > hi_bits)
                r_[j] = _encode_exact(*_decompose(flat[i + j]), fmt, rounding, overflow, None)
            out[i:i + k] = r_

    _parallel(part, b.size, out.itemsize)
    return out.reshape(a.shape)


def _torch_twin(fmt: FloatFormat):
    """The torch dtype with exactly ``fmt``'s layout and rules (fp16, bf16), or None."""
    if torch is None or fmt.specials != "ieee" or not fmt.has_subnormals:
        return None
    return {(5, 10, 15): torch.float16, (8, 7, 127): torch.bfloat16}.get(
        (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias))


_PROBES: dict[FloatFormat, tuple[np.ndarray, np.ndarray]] = {}


def _torch_kernel_rounds_correctly(fmt: FloatFormat, tdt) -> bool:
    """Whether torch's float32 -> ``tdt`` kernel rounds like the exact algorithm *now*.

    The kernels are exact IEEE round-to-nearest-even on every non-NaN float32
    (checked exhaustively, all 2^32 patterns, against ml_dtypes), but a CPU
    instruction that flushes subnormals (VCVTNEPS2BF16 always does; F16C paths
    do under ``torch.set_flush_denormal(True)``) would silently change results.
    So each large call first converts a probe of the hard cases (float32 and
    target subnormals, ties both ways, the overflow threshold) and compares.
    """
    probe = _PROBES.get(fmt)
    if probe is None:
        tiny, big = fmt.min_subnormal, fmt.max_finite
        ulp_top = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
        vals = np.array([tiny, tiny / 2, tiny * 1.5, tiny * 2.5, tiny * 0.75, fmt.min_normal * (1 - 2.0**-fmt.mantissa_bits),
                         1 + 2.0 ** -(fmt.mantissa_bits + 1), 1 + 3 * 2.0 ** -(fmt.mantissa_bits + 1),
                         big, big + ulp_top / 2, big + ulp_top / 4, 2.0**-149, 2.0**-130, 0.0, np.inf], np.float64)
        vals = np.concatenate([vals, -vals]).astype(np.float32)  # every value listed is exact in float32
        vals = np.tile(vals, 64 // vals.size + 2)  # fill whole vector registers, not only the scalar tail
        _PROBES[fmt] = probe = (vals, _encode_exact(*_decompose(vals), fmt, "nearest_even", "ieee", None)
                                .astype(np.uint16))
    vals, want = probe
    got = torch.from_numpy(vals).to(tdt).view(torch.int16).numpy().view(np.uint16)
    return bool(np.array_equal(got, want))


def _torch_view(a: np.ndarray, tdt) -> "torch.Tensor":
    """A tensor sharing ``a``'s memory, reinterpreted as ``tdt`` (same item size)."""
    t = torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a)
    return t if t.dtype == tdt else t.view(tdt)


def _faulted_in(n: int, dtype) -> np.ndarray:
    """``np.empty(n, dtype)`` with every page already touched, by this thread alone.

    numpy maps large arrays on huge pages (torch's allocator does not, and pays
    more in page faults than a conversion costs). But torch's worker threads
    faulting the fresh pages of one array at once often stall each other, so
    the pages are touched first from one thread.
    """
    out = np.empty(n, dtype)
    out.view(np.uint8)[::4096] = 0
    return out


def _encode_f32_torch(a: np.ndarray, fmt: FloatFormat, tdt) -> np.ndarray:
    """float32 -> fp16/bf16 by torch's vectorised conversion kernel (F16C / AVX2 / AVX-512 on x86),
    into a numpy array (see :func:`_faulted_in`). Only NaN differs from lowbit's rule (torch writes
    0xFFFF for every bf16 NaN, keeps fp16 payloads, and its scalar tail loop writes yet another
    pattern), so NaN elements are redone by the exact path."""
    flat = a.reshape(-1)
    out = _faulted_in(flat.size, np.uint16)
    codes = _torch_view(out, tdt)
    codes.copy_(torch.from_numpy(flat))
    if bool(torch.isnan(codes.max())):  # max propagates NaN; a NaN code comes only from a NaN input
        j = np.flatnonzero(np.isnan(flat))
        out[j] = _encode_exact(*_decompose(flat[j]), fmt, "nearest_even", "ieee", None)
    return out.reshape(a.shape)


# --------------------------------------------------------------- public API
def encode(
    x: Any,
    fmt: FormatLike,
    *,
    rounding: str = "nearest_even",
    overflow: str = "ieee",
    seed: int | None = None,
    generator: np.random.Generator | None = None,
    subnormals: str = "keep",
) -> Any:
    """Round ``x`` to ``fmt`` and return its bit patterns.

    ``x``: numpy array, torch tensor or Python number, of float16, bfloat16,
    float32, float64 or integer dtype, each rounded exactly in one step.
    Returns unsigned codes of ``fmt.storage_dtype`` (uint8 / uint16 / uint32;
    sub-byte formats use one uint8 per code), same shape, same kind as ``x``
    (a Python int for a scalar). Rounding, subnormal, overflow, NaN and zero
    rules: see the module docstring.
    """
    fmt = get_format(fmt)
    check_modes(rounding, overflow, subnormals)
    rng = _rng(rounding, seed, generator)  # type: ignore[arg-type]  # _rng refuses a torch.Generator here
    a = real_array(x)
    if a.dtype == np.float32 and rounding != "stochastic":
        a = contiguous(a)
        if fmt.bits == 32 and overflow == "ieee":  # identity; NaN payloads are kept
            codes = a.view(np.uint32).copy()
        elif a.size >= _PARALLEL_MIN and a.flags.writeable and rounding == "nearest_even" \
                and overflow == "ieee" and (tdt := _torch_twin(fmt)) is not None \
                and _torch_kernel_rounds_correctly(fmt, tdt):
            codes = _encode_f32_torch(a, fmt, tdt)
        elif fmt.bits <= 8 and fmt.specials == "ieee" and fmt.signed and 1 <= fmt.mantissa_bits <= 6 \
                and 1 <= fmt.bias <= 126 and rounding == "nearest_even" and overflow == "ieee" \
                and (codes_ := _encode_f32_ieee8(a, fmt)) is not None:
            codes = codes_
        elif fmt.bits <= 8 and fmt.mantissa_bits <= 6:
            codes = _encode_f32_byte(a, fmt, rounding, overflow)
        elif fmt.exponent_bits == 8 and fmt.bias == 127 and fmt.specials == "ieee" and overflow == "ieee" \
                and fmt.mantissa_bits < 23:
            codes = _encode_f32_top(a, fmt, rounding)
        elif 7 <= fmt.mantissa_bits <= 22 and fmt.has_subnormals:
            codes = _encode_f32_wide(a, fmt, rounding, overflow)
        else:
            codes = _encode_exact(*_decompose(a), fmt, rounding, overflow, rng).astype(fmt.storage_dtype)
    else:
        codes = _encode_exact(*_decompose(a), fmt, rounding, overflow, rng).astype(fmt.storage_dtype)
    if subnormals == "flush":
        codes = flush_subnormals(codes, fmt)
    return like(codes, x)


def flush_subnormals(codes: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """``codes`` with every subnormal code (exponent field 0, mantissa nonzero) replaced by the zero
    of its sign (+0 in fnuz formats, whose "-0" pattern is NaN); the array is changed in place where
    it can be. Formats without subnormals come back as they are."""
    if not fmt.has_subnormals or fmt.mantissa_bits == 0:
        return codes
    c = np.asarray(codes)
    mag = c & ~np.asarray(fmt.sign_mask, c.dtype) if fmt.signed else c
    sub = (mag != 0) & (mag < (1 << fmt.mantissa_bits))
    if not sub.any():
        return codes
    zero = 0 if (fmt.specials == "fnuz" or not fmt.signed) else (c & np.asarray(fmt.sign_mask, c.dtype))
    out = np.where(sub, zero, c).astype(c.dtype)
    return out


_DECODE_TABLES: dict[FloatFormat, np.ndarray] = {}


def _decode_exact(codes: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Vectorized exact decode to float64 (every value of a <=32-bit format fits)."""
    c = codes.astype(np.int64)
    m = fmt.mantissa_bits
    neg = (c & fmt.sign_mask) != 0
    mag = c & ~fmt.sign_mask if fmt.signed else c
    fe, mant = mag >> m, mag & ((1 << m) - 1)
    if fmt.specials == "fnu":
        v = np.ldexp(1.0, fe - fmt.bias)
    else:
        sig = np.where(fe == 0, mant, mant + (1 << m)).astype(np.float64)
        v = np.ldexp(sig, np.maximum(fe, 1) - fmt.bias - m)
    v = np.where(neg, -v, v)
    if fmt.has_inf:
        top = fe == (1 << fmt.exponent_bits) - 1
        v = np.where(top, np.where(mant == 0, np.where(neg, -np.inf, np.inf), np.nan), v)
        v = np.where(top & (mant != 0) & neg, -np.nan, v)
    elif fmt.specials == "fnuz":
        v = np.where(c == fmt.nan_code, np.nan, v)
    elif fmt.nan_code is not None:  # fn, fnu
        v = np.where(mag == fmt.nan_code, np.where(neg, -np.nan, np.nan), v)
    return v


def decode_table(fmt: FormatLike) -> np.ndarray:
    """float32 value of every code of a format of at most 16 bits (``decode(arange(num_codes))``; read-only)."""
    fmt = get_format(fmt)
    if fmt.bits > 16:
        raise ValueError(f"decode_table: {fmt.name} has {fmt.bits}-bit codes; tables cover 16 bits or fewer")
    return _decode_table(fmt)


def _decode_table(fmt: FloatFormat) -> np.ndarray:
    t = _DECODE_TABLES.get(fmt)
    if t is None:
        with np.errstate(over="ignore", invalid="ignore"):  # special codes compute inf/nan on purpose
            t = _decode_exact(np.arange(fmt.num_codes), fmt).astype(np.float32)
        t.flags.writeable = False
        _DECODE_TABLES[fmt] = t
    return t


def _decode_torch(flat: np.ndarray, fmt: FloatFormat, tdt) -> np.ndarray:
    """fp16 codes -> float32 by torch's conversion kernel (F16C on x86; faster than the table lookup), into
    a numpy array (see :func:`_faulted_in`). Every non-NaN code converts exactly; NaN codes are redone
    by the numpy path, since torch's vector and scalar loops disagree on them. (bf16 decode is a shift,
    done by the C pass; a C gather over the 64K-entry fp16 table was no faster than this.)"""
    out = _faulted_in(flat.size, np.float32)
    src = _torch_view(flat, tdt)
    torch.from_numpy(out).copy_(src)
    if bool(torch.isnan(src.max())):
        j = np.flatnonzero(np.isnan(out))
        out[j] = decode(flat[j], fmt)
    return out


def decode(bits: Any, fmt: FormatLike) -> Any:
    """Values of bit patterns ``bits`` in ``fmt``, as float32 (exact for every format).

    ``bits``: integer array/tensor/int of codes (only the low ``fmt.bits``
    bits may be set; anything wider is a ValueError naming the bad code).
    NaN codes decode to NaN with the code's sign. Same kind as the input.
    """
    fmt = get_format(fmt)
    b = as_numpy(bits, "bits")
    if b.dtype.kind not in "iu":
        raise TypeError(f"bits: expected integer codes, got dtype {b.dtype}")
    if fmt.bits == 32:
        out = contiguous(b).astype(np.uint32, copy=False).view(np.float32).copy()
        return like(out, bits)
    # unsigned codes no wider than the format cannot be out of range: skip two passes over the data
    if b.size and not (b.dtype.kind == "u" and b.dtype.itemsize * 8 <= fmt.bits):
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= fmt.num_codes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"bits: code {bad} is not a {fmt.bits}-bit pattern of {fmt.name}")
    if fmt.bits <= 16:
        flat = contiguous(b).reshape(-1)
        if flat.size >= _PARALLEL_MIN and flat.dtype == np.uint16 and flat.flags.writeable \
                and (tdt := _torch_twin(fmt)) is torch.float16:
            return like(_decode_torch(flat, fmt, tdt).reshape(b.shape), bits)
        out = np.empty(flat.shape, np.float32)
        if fmt.exponent_bits == 8 and fmt.bias == 127 and fmt.specials == "ieee":
            # bf16-like: the code is the top of a float32 pattern
            o32 = out.view(np.uint32)
            sh = 32 - fmt.bits
            lib = _KERNELS.get() if flat.dtype == np.uint16 else None
            if lib is not None:
                lib.lowbit_decode_top16(flat.ctypes.data, flat.size, sh, o32.ctypes.data, threads())
                return like(out.reshape(b.shape), bits)

            def part(lo: int, hi: int) -> None:
                for i in range(lo, hi, _CHUNK):
                    o = o32[i:min(i + _CHUNK, hi)]
                    o[...] = flat[i:i + o.size]  # widen, then shift in place: two tight loops
                    np.left_shift(o, sh, out=o)
        else:
            table = _decode_table(fmt)
            lib = _KERNELS.get() if flat.dtype in (np.uint8, np.uint16) else None
            if lib is not None:  # every code was checked to index the table
                lib.lowbit_decode_table(flat.ctypes.data, flat.itemsize, flat.size, table.ctypes.data, table.size,
                                        out.ctypes.data, threads())
                return like(out.reshape(b.shape), bits)
            src = flat if flat.dtype.itemsize <= 2 and flat.dtype.kind == "u" else flat.astype(np.intp)

            def part(lo: int, hi: int) -> None:
                for i in range(lo, hi, _CHUNK):
                    np.take(table, src[i:min(i + _CHUNK, hi)], out=out[i:min(i + _CHUNK, hi)])

        _parallel(part, flat.size, 4)
        return like(out.reshape(b.shape), bits)
    with np.errstate(over="ignore", invalid="ignore"):
        out = _decode_exact(b, fmt).astype(np.float32)
    return like(out, bits)


def _round_values(a: np.ndarray, fmt: FloatFormat, rounding, overflow, rng, subnormals: str = "keep") -> np.ndarray:
    if a.dtype == np.float32 and rounding != "stochastic":
        codes = encode(a, fmt, rounding=rounding, overflow=overflow, subnormals=subnormals)
    else:
        codes = _encode_exact(*_decompose(a), fmt, rounding, overflow, rng).astype(fmt.storage_dtype)
        if subnormals == "flush":
            codes = flush_subnormals(codes, fmt)
    return decode(codes, fmt)


_M32 = 0xFFFFFFFF


def _mix32(h: "torch.Tensor") -> "torch.Tensor":
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values below 2**32, in
    int64 arithmetic that never overflows (each multiplier is below 2**31), so every device computes
    the same bits, in eager mode and compiled."""
    for mult in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        h = h ^ (h >> 16)
        h = (h * mult) & _M32
    return h ^ (h >> 16)


def _seed_key(seed: int) -> int:
    """The 32-bit key of a seed (any Python int, folded 32 bits at a time), computed in Python."""
    key = 0x9E3779B9
    for part in (seed & _M32, (seed >> 32) & _M32, (seed >> 64) & _M32):
        key ^= part
        for mult in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
            key ^= key >> 16
            key = (key * mult) & _M32
        key ^= key >> 16
    return key


def _counter_bits(shape: "torch.Size", seed: int, device: Any, nbits: int) -> "torch.Tensor":
    """Uniform random integers in ``[0, 2**nbits)`` (``nbits`` <= 62), int64, one per element of
    ``shape``: a hash of (the seed, the element's index, a word counter). Reproducible from the seed
    alone, the same on every device, and made of tensor ops that ``torch.compile`` traces."""
    n = 1
    for d in shape:
        n *= int(d)
    idx = torch.arange(n, device=device, dtype=torch.int64)
    lo, hi = idx & _M32, idx >> 32
    key = _seed_key(seed)
    out = torch.zeros(n, device=device, dtype=torch.int64)
    for word in range((nbits + 31) // 32):
        h = _mix32(_mix32(lo ^ ((key + 0x632BE5AB * word) & _M32)) ^ hi)
        out = (out << 32) | h
    return (out & ((1 << nbits) - 1)).reshape(shape)


def _random_increment(bits: "torch.Tensor", nbits: int, generator: "torch.Generator | None",
                      seed: int | None) -> "torch.Tensor":
    if seed is not None:
        return _counter_bits(bits.shape, seed, bits.device, nbits).to(bits.dtype)
    return torch.randint(0, 1 << nbits, bits.shape, generator=generator, device=bits.device, dtype=bits.dtype)


def _round_tensor(x: "torch.Tensor", fmt: FloatFormat, rounding: str, overflow: str, subnormals: str,
                  generator: "torch.Generator | None" = None, seed: int | None = None) -> "torch.Tensor":
    """``x`` rounded to ``fmt`` in torch alone (on ``x``'s device; compiles): the value ``round_to`` gives,
    in float32 (float64 for float64 input, so each value is rounded once), before the cast back.

    Above the format's smallest normal the float's own bit pattern is rounded: adding the rounding
    increment to the integer view carries into the exponent exactly as a rounding up does. Below it
    the quantum is a fixed power of two, a normal float here, so ``x / quantum`` is exact and rounds
    as an integer (``bf16``, whose range is float32's, rounds float32's subnormals by the bit pattern
    too). Then subnormal flushing, overflow (inf, NaN or saturation as the format and mode say), the
    sign (negative zero only where the format has one) and NaN. NaN input gives NaN, also for formats
    with no NaN code (:func:`round_to` refuses those before it calls this). Stochastic rounding draws
    from ``generator`` (a ``torch.Generator``) or, with ``seed``, from :func:`_counter_bits`."""
    wide = x.dtype == torch.float64
    ft, it, mant = (torch.float64, torch.int64, 52) if wide else (torch.float32, torch.int32, 23)
    v = x.to(ft)
    a = v.abs()
    drop = mant - fmt.mantissa_bits
    bits = a.view(it)
    if rounding == "nearest_even":
        inc = ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1) if drop else torch.zeros_like(bits)
    elif rounding == "nearest_away":
        inc = torch.full_like(bits, 1 << (drop - 1)) if drop else torch.zeros_like(bits)
    elif rounding == "toward_zero":
        inc = torch.zeros_like(bits)
    else:  # stochastic: a uniform increment below one unit in the last kept place
        inc = _random_increment(bits, drop, generator, seed)
    r = ((bits + inc) & ~((1 << drop) - 1)).view(ft)
    min_normal = 2.0 ** fmt.min_exponent
    quantum_exp = fmt.min_exponent - fmt.mantissa_bits
    if fmt.min_exponent > (-1022 if wide else -126):  # the format's subnormals are not the float's own
        t = a * 2.0 ** -quantum_exp  # exact: a power of two, and the result stays below 2**mantissa_bits
        if rounding == "nearest_even":
            q = torch.round(t)
        elif rounding == "nearest_away":
            q = torch.floor(t + 0.5)
        elif rounding == "toward_zero":
            q = torch.trunc(t)
        else:
            u = _random_increment(bits, mant + 1, generator, None if seed is None else seed ^ 0x5DEECE66D)
            q = torch.floor(t + u.to(ft) * 2.0 ** -(mant + 1))  # u uniform on [0, 1), exact in ft
        r = torch.where(a < min_normal, q * 2.0 ** quantum_exp, r)
    if subnormals == "flush":
        r = torch.where(r < min_normal, torch.zeros_like(r), r)
    top = float(fmt.max_finite)
    if rounding == "toward_zero":  # IEEE 754: rounding toward zero never overflows; a finite value beyond is max
        r = torch.where(r > top, torch.full_like(r, top), r)
    over = (r > top) | torch.isinf(a)
    if overflow == "saturate" or fmt.specials == "finite":
        r = torch.where(over, torch.full_like(r, top), r)
    else:
        r = torch.where(over, torch.full_like(r, float("inf") if fmt.specials == "ieee" else float("nan")), r)
    r = torch.where(torch.isnan(a), a, r)
    if fmt.specials == "fnuz":  # no negative zero
        return r.where(r != 0, torch.zeros_like(r)).copysign(torch.where(r == 0, torch.ones_like(v), v))
    return r.copysign(v)


if torch is not None:

    class _RoundSTE(torch.autograd.Function):
        """Rounding in the forward pass (in torch, :func:`_round_tensor`), identity gradient
        (straight-through) backward."""

        @staticmethod
        def forward(ctx, x, fmt, rounding, overflow, generator, subnormals="keep", seed=None):  # noqa: D401
            return _round_tensor(x, fmt, rounding, overflow, subnormals, generator, seed).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None, None, None, None, None


def round_to(
    x: Any,
    fmt: FormatLike,
    *,
    rounding: str = "nearest_even",
    overflow: str = "ieee",
    seed: int | None = None,
    generator: "np.random.Generator | torch.Generator | None" = None,
    subnormals: str = "keep",
) -> Any:
    """``decode(encode(x))``: ``x`` as stored in ``fmt``, in ``x``'s own type and dtype.

    Floating inputs keep their dtype (the stored value is cast back, which is
    exact whenever the format's values fit that dtype, e.g. fp8 into fp16);
    integer inputs return float64 (numpy/scalar) or float32 (torch). On
    torch tensors the result is differentiable with a straight-through
    gradient (d round_to / dx = 1), for simulating low precision in training,
    and computed in torch on the tensor's device (:func:`_round_tensor`; it
    compiles with ``torch.compile(fullgraph=True)``), with the numpy path's
    values.

    Stochastic rounding on a tensor stays in torch on its device: with ``seed`` (an int; e.g. a base seed
    plus the training step) the random bits are a hash of the seed and each element's index, the same
    on CPU and CUDA and under ``torch.compile(fullgraph=True)``; with ``generator`` a ``torch.Generator``
    on the tensor's device (eager). Neither gives the numpy stream's bits.

    NaN into a format with no NaN code (fp6, fp4) raises ValueError on arrays and tensors alike; a
    compiled graph cannot raise on data, so there (and only there) such a NaN comes back as NaN.
    """
    fmt = get_format(fmt)
    check_modes(rounding, overflow, subnormals)
    if is_torch(x):
        if x.is_complex() or x.dtype == torch.bool:
            real_array(x)  # the one wording for an unsupported dtype
        if isinstance(generator, torch.Generator) or (seed is not None and generator is None and rounding == "stochastic"
                                                      and x.is_floating_point() and fmt.specials != "fnu"):
            return _round_tensor_seeded(x, fmt, rounding, overflow, subnormals, seed, generator)
        rng = _rng(rounding, seed, generator)  # type: ignore[arg-type]  # a torch.Generator returned above
        if not x.is_floating_point() or fmt.specials == "fnu":
            # integers round exactly and come back float32 (bf16/fp8 values fit); exponent-only formats
            # take the numpy path (CPU)
            v = _round_values(real_array(x), fmt, rounding, overflow, rng, subnormals)
            return torch.from_numpy(np.asarray(v)).to(device=x.device, dtype=x.dtype if x.is_floating_point()
                                                       else torch.float32)
        gen = None
        if rng is not None:  # stochastic from a numpy generator: a torch stream seeded from it (eager)
            gen = torch.Generator(device=x.device).manual_seed(int(rng.integers(0, 2**63 - 1)))
        return _round_tensor_checked(x, fmt, rounding, overflow, subnormals, gen, None)
    rng = _rng(rounding, seed, generator)  # type: ignore[arg-type]  # _rng refuses a torch.Generator here
    a = real_array(x)
    v = np.asarray(_round_values(a, fmt, rounding, overflow, rng, subnormals))
    src = as_numpy(x).dtype
    out_dtype = src if (src.kind == "f" or src in SMALL_FLOAT_DTYPES) else np.dtype(np.float64)
    return like(v.astype(out_dtype), x)


def _round_tensor_seeded(x: "torch.Tensor", fmt: FloatFormat, rounding: str, overflow: str, subnormals: str,
                         seed: int | None, generator: "torch.Generator | None") -> "torch.Tensor":
    """round_to of a floating tensor given a torch generator or a seed for stochastic rounding."""
    if rounding != "stochastic":
        raise ValueError("seed/generator only apply to rounding='stochastic'")
    if generator is not None and seed is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if not x.is_floating_point() or fmt.specials == "fnu":
        raise ValueError(f"a torch.Generator applies to floating tensors and {fmt.name}'s sign-magnitude codes; "
                         "give seed=<int> instead")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"the generator is on {generator.device}, the tensor on {x.device}: use one on the tensor's device")
    return _round_tensor_checked(x, fmt, rounding, overflow, subnormals, generator, seed)


def _round_tensor_checked(x: "torch.Tensor", fmt: FloatFormat, rounding: str, overflow: str, subnormals: str,
                          generator: "torch.Generator | None", seed: int | None) -> "torch.Tensor":
    if fmt.specials == "finite" and not torch.compiler.is_compiling() and bool(torch.isnan(x).any()):
        raise ValueError(f"input contains NaN, which {fmt.name} cannot represent (it has no NaN encoding)")
    if torch.is_grad_enabled() and x.requires_grad:
        return _RoundSTE.apply(x, fmt, rounding, overflow, generator, subnormals, seed)
    return _round_tensor(x, fmt, rounding, overflow, subnormals, generator, seed).to(x.dtype)


def fields(x: Any, fmt: FormatLike) -> tuple[Any, Any, Any]:
    """(sign, biased exponent, mantissa) fields of ``x`` rounded to ``fmt``, as integer arrays.

    The sign is 0 for unsigned formats.
    """
    fmt = get_format(fmt)
    c = as_numpy(encode(x, fmt)).astype(np.int64)
    m = fmt.mantissa_bits
    sign = (c & fmt.sign_mask) != 0 if fmt.signed else np.zeros_like(c, dtype=bool)
    mag = c & ~fmt.sign_mask if fmt.signed else c
    return sign.astype(np.int64), mag >> m, mag & ((1 << m) - 1)


def describe(value: float, fmt: FormatLike, **modes: Any) -> str:
    """Human-readable breakdown of one number stored in ``fmt``.

    Example: ``describe(3.14125, "fp16")`` ->
    ``'0 10000 1001001000 = +1.5703125 x 2^1 = 3.140625 (error -0.000625)'``;
    the error is stored minus given value, computed exactly.
    """
    from fractions import Fraction

    fmt = get_format(fmt)
    if isinstance(value, (np.ndarray,)) and value.ndim == 0:
        value = value.item()
    if is_torch(value):
        value = value.item()  # type: ignore[attr-defined]
    code = int(as_numpy(encode(np.asarray(value), fmt, **modes)))
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    mag = code & ~fmt.sign_mask if fmt.signed else code
    fe, mant = mag >> m, mag & ((1 << m) - 1)
    parts = ([str(int(bool(code & fmt.sign_mask)))] if fmt.signed else []) + [format(fe, f"0{e}b")]
    if m:
        parts.append(format(mant, f"0{m}b"))
    pattern = " ".join(parts)
    v = fmt.exact_value(code)
    if isinstance(v, float):  # inf or nan
        return f"{pattern} = {v}"
    if not math.isfinite(value):  # inf saturated to the largest finite value: the error is infinite
        return f"{pattern} = {float(v)!r} (error {'-' if value > 0 else '+'}inf)"
    neg = v < 0
    if v == 0:
        return f"{pattern} = {'-' if neg or (code & fmt.sign_mask) else '+'}0 (error {_fmt_err(-Fraction(value))})"
    if fmt.specials == "fnu":
        sig, ex = Fraction(1), fe - fmt.bias
    elif fe == 0:
        sig, ex = Fraction(mant, 1 << m), 1 - fmt.bias
    else:
        sig, ex = 1 + Fraction(mant, 1 << m), fe - fmt.bias
    err = v - Fraction(value)
    return f"{pattern} = {'-' if neg else '+'}{float(sig)!r} x 2^{ex} = {float(v)!r} (error {_fmt_err(err)})"


def _fmt_err(err) -> str:
    f = float(err)
    return "0" if err == 0 else f"{f:+.6g}"
