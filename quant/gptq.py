"""GPTQ (Frantar et al. 2022) and the optimal-brain-surgeon sweep it shares with SparseGPT.

A Linear layer ``y = x Wᵀ`` is compressed column by column (input feature by input
feature). Each column is rounded (and, for SparseGPT, some of its entries are
pruned); the rounding error is spread over the columns not yet processed with the
inverse Hessian of the layer's reconstruction error ``H = 2 XᵀX / n`` (``X``: the
layer's calibration inputs as (tokens, in)), so that the layer's *output* error
is minimised rather than the weight error:

* ``H`` is damped by ``damp`` times its mean diagonal; an input feature that never
  receives a nonzero activation is a dead column (its weights are set to 0 and
  its diagonal to 1, as the paper's code does);
* the upper Cholesky factor ``U`` of ``H⁻¹`` drives the sweep: after column ``i`` is
  rounded to ``q``, every later column ``j`` gets ``-(w_i - q) / U_ii · U_ij``, in
  blocks of ``block_size`` columns whose updates to the rest are one matrix product;
* ``act_order`` processes columns by decreasing ``H_ii`` (the most activated
  features first). Group scales are then computed up front from the weights in
  storage order ("static groups"), so that every group of the stored tensor keeps
  one scale and the stored form is the RTN one. Without act order a group's scale is
  computed when the sweep reaches the group's first column, from the weights as
  updated so far, as the paper does.

Scales come from the existing calibrators (``quant.calibrate``: minmax, MSE clip...)
and the rounding is lowbit's one rounding rule
``clamp(rint(w · (1/s)) + z, qmin, qmax)`` (see :mod:`quant.quantize`), so with an
identity Hessian the sweep changes nothing and GPTQ equals round-to-nearest bit
for bit. Everything is torch float32 (``H`` is accumulated and factored in float64)
with BLAS matrix products; the only Python loop is per column.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .calibrate import METHODS, calibrate
from .quantize import QParams
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .storage import IntQuant, round_scales_up


@dataclass(frozen=True)
class GPTQ:
    """GPTQ's settings (see the module docstring).

    * ``damp``: added to the Hessian's diagonal, as a fraction of its mean (0.01 in the paper);
    * ``block_size``: columns per lazy batch update (a multiple of the group size is used);
    * ``act_order``: process columns by decreasing Hessian diagonal (static group scales).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1e3:
            raise ValueError(f"GPTQ: damp must be a non-negative fraction of the mean Hessian diagonal, got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQ: block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"GPTQ: act_order must be True or False, got {self.act_order!r}")

    def describe(self) -> str:
        return f"GPTQ damp={self.damp}{' act-order' if self.act_order else ''}"


class Hessian:
    """The running ``2 XᵀX / n`` of a layer's inputs (float64), fed batch by batch with :meth:`add`;
    ``n`` counts the rows (tokens) seen and :attr:`matrix` is the mean."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, features)."""
        x = x.detach().reshape(-1, self.sum.shape[0]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.sum * (2.0 / self.n)


@dataclass(frozen=True)
class Pruning:
    """What SparseGPT prunes inside the sweep: ``sparsity`` of every block of columns (exactly, by
    the OBS saliency ``w² / U_ii²``), or ``n`` of every ``m`` consecutive inputs when ``m`` is set."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not 0 <= self.n <= self.m:
                raise ValueError(f"Pruning: N:M needs 0 <= n <= m, got {self.n}:{self.m}")
        elif not 0 <= self.sparsity <= 1:
            raise ValueError(f"Pruning: sparsity must be a fraction in [0, 1], got {self.sparsity}")


@dataclass
class SweepResult:
    """``values``: the compressed weight (float32, (out, in)); ``qparams``: what the value method
    stores besides the codes (``QParams`` for integers, the float cast's ``Cast`` or the block format's
    ``BlockCodes`` for float formats; None without quantization); ``keep``: the kept mask (None without
    pruning); ``damp``: the damping that made ``H`` positive definite (a multiple of the asked one when
    it had to grow)."""

    values: torch.Tensor
    qparams: Any
    keep: torch.Tensor | None
    damp: float


class Grid:
    """The values one column may take: ``group`` consecutive columns share params, set up front for
    every group from the weights in storage order (:meth:`fit_all`) or, where ``lazy``, when the sweep
    reaches a group's first column (:meth:`fit`); :meth:`round` puts a column on its group's grid and
    :meth:`params` is what the value method stores besides the codes."""

    group: int
    lazy: bool = False

    def fit_all(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def fit(self, g: int, w: torch.Tensor) -> None:
        raise NotImplementedError

    def round(self, col: torch.Tensor, g: int) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> Any:
        raise NotImplementedError

    def fitted_values(self) -> torch.Tensor:
        """The weights given to :meth:`fit_all`, on the grid (round to nearest, float32)."""
        raise NotImplementedError


class IntGrid(Grid):
    """An integer ``spec`` per channel or per group along the input axis, params by ``calibration``,
    rounded by lowbit's one rule ``clamp(rint(w · (1/s)) + z, qmin, qmax)`` (:mod:`quant.quantize`)."""

    lazy = True

    def __init__(self, spec: QuantSpec, calibration: str, shape: tuple[int, int], percentile: float | None = None,
                 scale_dtype: str = "float32") -> None:
        if calibration not in METHODS or calibration in ("moving_average", "entropy"):
            raise ValueError(f"GPTQ: calibration must be minmax, percentile or mse, got {calibration!r}")
        rows, cols = shape
        self.spec, self.calibration, self.shape, self.scale_dtype = spec, calibration, shape, scale_dtype
        self.percentile = 99.99 if percentile is None else percentile  # calibrate's own default
        self.group = _group_size(spec, cols)
        n = cols // self.group
        self.scale, self.zero, self.inv = torch.ones(n, rows), torch.zeros(n, rows), torch.ones(n, rows)
        self.lo, self.hi = torch.zeros(n, rows), torch.zeros(n, rows)  # qmin - z, qmax - z: the clamp of v = q - z

    def _set(self, g: slice | int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        # the sweep rounds to the scales that will be stored (IntQuant.scale_dtype rounds them up)
        self.scale[g] = scale if self.scale_dtype == "float32" else \
            torch.from_numpy(round_scales_up(scale.numpy(), self.scale_dtype))
        self.zero[g] = zero
        self.inv[g] = 1.0 / self.scale[g]  # float32, as quant.quantize computes it
        self.lo[g], self.hi[g] = self.spec.qmin - self.zero[g], self.spec.qmax - self.zero[g]

    def fit_all(self, w: torch.Tensor) -> None:  # RTN's own params, in one call
        rows, cols = self.shape
        qp = calibrate(np.ascontiguousarray(w.numpy()), self.spec, self.calibration,
                       percentile=self.percentile)
        self._set(slice(None), torch.from_numpy(qp.scale.reshape(rows, -1).T.copy()),
                  torch.from_numpy(qp.zero_point.reshape(rows, -1).T.astype(np.float32)))

    def fit(self, g: int, w: torch.Tensor) -> None:
        qp = calibrate(np.ascontiguousarray(w.numpy()), replace(self.spec, granularity=PerChannel(0)), self.calibration,
                       percentile=self.percentile)
        self._set(g, torch.from_numpy(qp.scale.reshape(-1)), torch.from_numpy(qp.zero_point.reshape(-1).astype(np.float32)))

    def round(self, col: torch.Tensor, g: int) -> torch.Tensor:
        v = torch.round(col * self.inv[g])  # rint(x * (1/s)), ties to even
        return v.clamp_(self.lo[g], self.hi[g]).mul_(self.scale[g])

    def params(self) -> QParams:
        pshape = self.spec.params_shape(self.shape)
        return QParams(self.scale.T.numpy().reshape(pshape), self.zero.T.numpy().astype(np.int32).reshape(pshape),
                       self.spec, self.shape)


class FloatGrid(Grid):
    """A float format (``precision.cast.FloatCast``): its scale (none, per tensor or per output channel)
    from the weights up front, each column divided by it, rounded in the format and multiplied back,
    with the cast's rounding and subnormal modes and saturation (the arithmetic of ``precision.cast``)."""

    def __init__(self, method: Any, shape: tuple[int, int]) -> None:
        if method.rounding == "stochastic":
            raise ValueError("GPTQ rounds deterministically; stochastic rounding does not apply")
        if method.scaling == "channel" and method.axis not in (0, -2):
            raise ValueError("GPTQ takes weights stored (out, in): a float cast scaled per channel along axis 0")
        self.method, self.shape, self.group = method, shape, shape[1]
        self.cast: Any = None
        self.row_scale: np.ndarray | None = None  # one scale per output row (channel or tensor scaling)

    def fit_all(self, w: torch.Tensor) -> None:
        from precision.cast import cast

        m = self.method
        self.cast = cast(np.ascontiguousarray(w.numpy()), m.format, scaling=m.scaling, axis=0, rounding=m.rounding,
                         overflow=m.overflow, subnormals=m.subnormals)
        s = self.cast.scale
        self.row_scale = None if s is None else np.broadcast_to(s, (self.shape[0], 1))[:, 0].copy()

    def round(self, col: torch.Tensor, g: int) -> torch.Tensor:
        from precision.codec import decode, encode

        m = self.method
        x = col.numpy()
        if self.row_scale is not None:
            x = x / self.row_scale
        # saturate, whatever the cast's overflow mode: the error feedback can carry a weight past the
        # range its scale was set for, and the largest finite value is that weight's nearest
        v = np.asarray(decode(encode(x, m.format, rounding=m.rounding, overflow="saturate", subnormals=m.subnormals),
                              m.format), np.float32)
        return torch.from_numpy(v * self.row_scale if self.row_scale is not None else v)

    def params(self) -> Any:
        return self.cast

    def fitted_values(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.cast.values(), np.float32))


class BlockGrid(Grid):
    """A block-scaled format (``precision.blocks.BlockCast``: MX, NVFP4): every block's scale (and
    NVFP4's tensor scale) from the weights up front by the format's rule, each column's elements then
    rounded once under its block's scale (:func:`precision.blocks.encode_elements`)."""

    def __init__(self, method: Any, shape: tuple[int, int]) -> None:
        from precision.blocks import GGUF_RULES, get_block_format

        self.method, self.shape = method, shape
        self.fmt = get_block_format(method.format)
        if self.fmt.scale_rule in GGUF_RULES:
            raise ValueError(f"GPTQ: {self.fmt.describe()} blocks round as ggml does, which GPTQ does not; "
                             "use int8/int4 per group or an MX/NVFP4 format")
        if shape[1] % self.fmt.block:
            raise ValueError(f"{self.fmt.describe()} needs an input axis that is a multiple of {self.fmt.block}")
        self.group = self.fmt.block
        self.codes: Any = None

    def fit_all(self, w: torch.Tensor) -> None:
        from precision.blocks import block_encode

        self.codes = block_encode(np.ascontiguousarray(w.numpy()), self.fmt, rounding=self.method.rounding)

    def round(self, col: torch.Tensor, g: int) -> torch.Tensor:
        from precision.blocks import decode_elements, encode_elements

        b = self.codes
        v = col.numpy().reshape(-1, 1, 1)
        sc = b.scales[:, g:g + 1]
        codes = encode_elements(v, sc, self.fmt, b.tensor_scale, rounding=self.method.rounding)
        return torch.from_numpy(decode_elements(codes, sc, self.fmt, b.tensor_scale).reshape(-1))

    def params(self) -> Any:
        return self.codes

    def fitted_values(self) -> torch.Tensor:
        from precision.blocks import block_decode

        return torch.from_numpy(block_decode(self.codes))


def grid_for(method: Any, shape: tuple[int, int]) -> Grid:
    """The grid of a value method (``IntQuant``, ``FloatCast``, ``BlockCast``) or an integer
    ``QuantSpec`` (minmax params) for a weight of ``shape`` (out, in)."""
    from precision.blocks import BlockCast
    from precision.cast import FloatCast

    if isinstance(method, QuantSpec):
        return IntGrid(method, "minmax", shape)
    if isinstance(method, IntQuant):
        return IntGrid(method.spec, method.calibration, shape, method.percentile, method.scale_dtype)
    if isinstance(method, FloatCast):
        return FloatGrid(method, shape)
    if isinstance(method, BlockCast):
        return BlockGrid(method, shape)
    raise ValueError(f"GPTQ rounds to an integer, float or block format; got {type(method).__name__}")


def _group_size(spec: QuantSpec, columns: int) -> int:
    g = spec.granularity
    if isinstance(g, PerGroup):
        if g.reduced_axis not in (1, -1):
            raise ValueError("GPTQ quantizes groups along the input axis (PerGroup(size, reduced_axis=-1))")
        if columns % g.size:
            raise ValueError(f"PerGroup(size={g.size}) does not divide the {columns} input features")
        return g.size
    if isinstance(g, PerChannel) and g.kept_axis in (0, -2):
        return columns
    if isinstance(g, PerTensor):
        raise ValueError("GPTQ needs per-channel or per-group weights (a per-tensor scale would be set "
                         "before the sweep and clip what it moves); use PerChannel(0) or PerGroup(size)")
    raise ValueError("GPTQ quantizes per output channel (PerChannel(0)) or per group along the input axis")


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor ``U`` of ``(H + λ I)⁻¹`` (``(H + λI)⁻¹ = UᵀU``) with
    ``λ = damp · mean(diag H)``, in float32, and the ``damp`` used: when ``H + λI`` is not positive
    definite, λ grows tenfold, up to four times.

    With ``J`` the exchange matrix and ``R`` the lower Cholesky factor of ``J (H + λI) J``,
    ``U = J R⁻¹ J``: one factorization and one triangular inverse, no explicit inverse of ``H``."""
    mean = float(torch.diagonal(h).mean())
    if not mean > 0:
        mean = 1.0
    d = max(damp, 1e-8)
    n = h.shape[0]
    for _ in range(5):
        a = h.to(torch.float32, copy=True)
        a.diagonal().add_(d * mean)
        lower, info = torch.linalg.cholesky_ex(a.flip(0, 1))
        if int(info) == 0:
            r_inv = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
            if bool(torch.isfinite(r_inv).all()):
                return r_inv.flip(0, 1), d
        d *= 10
    raise ValueError("the layer's Hessian is not positive definite even with damping "
                     f"{d / 10:g} x its mean diagonal; give more (or more varied) calibration data")


def obs_sweep(weight: torch.Tensor, hessian: torch.Tensor, *, quantizer: Any = None, calibration: str = "minmax",
              pruning: Pruning | None = None, damp: float = 0.01, block_size: int = 128,
              act_order: bool = False) -> SweepResult:
    """One GPTQ / SparseGPT sweep over the columns of ``weight`` (out, in) with ``hessian`` (in, in).

    ``quantizer``: round every column to a grid (GPTQ): an integer ``QuantSpec`` (params by
    ``calibration``: minmax, percentile or mse), or a value method (``IntQuant``, ``FloatCast``,
    ``BlockCast`` for MX and NVFP4); ``pruning``: prune inside the sweep (SparseGPT); both: the joint
    pass of the SparseGPT paper. At least one is needed. Returns a :class:`SweepResult`; the input
    tensors are not modified.
    """
    if quantizer is None and pruning is None:
        raise ValueError("obs_sweep: give quantizer= (quantize), pruning= (prune) or both")
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"obs_sweep: weight must be (out, in) and hessian (in, in); got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    rows, cols = weight.shape
    grid: Grid | None = None
    if quantizer is not None:
        grid = IntGrid(quantizer, calibration, (rows, cols)) if isinstance(quantizer, QuantSpec) \
            else grid_for(quantizer, (rows, cols))
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = grid.group if grid is not None else cols
    if pruning is not None and pruning.m and act_order:
        raise ValueError("N:M pruning groups inputs in storage order, which act-order would permute; "
                         "use act_order=False (GPTQ(act_order=False), --no-act-order)")
    if pruning is not None and pruning.m and cols % pruning.m:
        raise ValueError(f"{pruning.n}:{pruning.m} pruning needs an input axis that is a multiple of {pruning.m}")
    if grid is not None and group < cols:  # a group never straddles two lazy blocks (its params see updated columns)
        block = group * max(1, block_size // group)
    else:
        block = block_size
    if pruning is not None and pruning.m:
        block = max(pruning.m, block - block % pruning.m)

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    static = grid is not None and (act_order or group == cols or not grid.lazy)
    if static:  # every group's params from the weights in storage order, before the sweep: RTN's own
        assert grid is not None
        grid.fit_all(w)
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    u, used_damp = inverse_hessian_factor(h, damp)
    # the sweep runs on Wᵀ (in, out): a column of W is then a contiguous row
    wt = w.T.contiguous()
    keep = torch.ones(cols, rows, dtype=torch.bool) if pruning is not None else None
    col_group = ((perm if perm is not None else torch.arange(cols)) // group).tolist()
    done = 0  # elements pruned so far, for the exact running count of unstructured pruning

    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = wt[b0:b1].clone()
        err = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        d1 = torch.diagonal(u1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool) if pruning is not None else None
        if pruning is not None and not pruning.m:
            assert mask1 is not None
            total = round(pruning.sparsity * rows * b1) - done  # the running count stays exact overall
            if total > 0:
                saliency = (w1 / d1[:, None]) ** 2
                mask1.view(-1)[torch.topk(saliency.reshape(-1), total, largest=False, sorted=False).indices] = True
            done += total
        for i in range(b1 - b0):
            c = b0 + i
            if pruning is not None and pruning.m and i % pruning.m == 0 and pruning.n < pruning.m:
                assert mask1 is not None  # prune the m - n least salient of the next m inputs, per output
                sal = (w1[i:i + pruning.m] / d1[i:i + pruning.m, None]) ** 2
                mask1[i:i + pruning.m].scatter_(0, torch.topk(sal, pruning.m - pruning.n, dim=0, largest=False).indices,
                                                True)
            col = w1[i]
            q = col.masked_fill(mask1[i], 0.0) if mask1 is not None else col
            if grid is not None:
                g = col_group[c]
                if not static and c % group == 0:  # the group's params from the weights as updated so far
                    grid.fit(g, torch.cat([w1[i:], wt[b1:]])[:group].T)
                q = grid.round(q, g)
            e = (col - q).div_(d1[i])
            w1[i:].addr_(u1[i, i:], e, alpha=-1)
            w1[i] = q
            err[i] = e
        wt[b0:b1] = w1
        if mask1 is not None:
            assert keep is not None
            keep[b0:b1] = ~mask1
        if b1 < cols:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)

    w = wt.T
    keep = keep.T if keep is not None else None
    if perm is not None:
        back = torch.argsort(perm)
        w = w[:, back]
        if keep is not None:
            keep = keep[:, back]
    w = w.contiguous()
    qp = grid.params() if grid is not None else None
    if keep is not None:
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    return SweepResult(w, qp, keep, used_damp)


def gptq(weight: Any, hessian: torch.Tensor, spec: QuantSpec, config: GPTQ = GPTQ(),
         calibration: str = "minmax") -> tuple[np.ndarray, QParams]:
    """GPTQ-quantize ``weight`` (out, in) given its layer's ``hessian`` (in, in; e.g.
    :attr:`Hessian.matrix`). Returns ``(codes, qparams)`` in the stored form of RTN with the
    same ``spec`` (``quant.dequantize(codes, qparams)`` is the quantized weight)."""
    from .quantize import quantize

    w = torch.as_tensor(weight).detach().float().cpu()
    r = obs_sweep(w, hessian, quantizer=spec, calibration=calibration, damp=config.damp,
                  block_size=config.block_size, act_order=config.act_order)
    assert r.qparams is not None
    codes = np.asarray(quantize(r.values.numpy(), r.qparams))
    return codes, r.qparams
