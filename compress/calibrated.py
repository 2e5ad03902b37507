"""Pruning from calibration data: Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023).

Both look at the inputs each Linear layer receives, layer by layer in forward order, with the
layers before already pruned (:func:`quant.solve.solve_layers`, the driver GPTQ uses too):

* **Wanda** scores weight ``W_ij`` by ``|W_ij| · ‖X_j‖₂`` (``X_j``: input feature j over the
  calibration tokens) and prunes the lowest scores of each output row (or the lowest ``m - n``
  of every ``m`` consecutive inputs, N:M); the kept weights are not changed.
* **SparseGPT** prunes inside GPTQ's optimal-brain-surgeon sweep (:func:`quant.gptq.obs_sweep`):
  per block of 128 inputs, the weights of lowest saliency ``w² / [H⁻¹]_jj`` (exactly the requested
  fraction of the block, or N:M), and the pruning error of each column is spread over the columns
  not yet processed. With an integer spec it quantizes in the same sweep (the paper's joint mode).

Both give exactly the requested sparsity: SparseGPT ``round(sparsity · size)`` elements per layer,
Wanda the same count spread over the rows (each row ``floor`` or ``ceil`` of its share), and N:M
exactly ``n`` of every ``m``.
"""

from __future__ import annotations

import torch

from quant.sequential import LayerInputs


def wanda_mask(weight: torch.Tensor, inputs: LayerInputs, sparsity: float | None = None, *, n: int = 0,
               m: int = 0) -> torch.Tensor:
    """The kept mask (bool, (out, in)) of Wanda for ``weight`` (out, in) given its layer's ``inputs``:
    ``sparsity`` of every output row by score ``|W| · ‖X_j‖₂``, or ``n`` kept of every ``m`` consecutive
    inputs when ``m`` is given. Ties: the lower input index is pruned first."""
    rows, cols = weight.shape
    score = weight.abs().float() * inputs.sq_sum.sqrt().float()[None, :]
    if m:
        if cols % m or not 0 <= n <= m:
            raise ValueError(f"Wanda {n}:{m} needs an input axis that is a multiple of m and 0 <= n <= m")
        g = score.reshape(rows, cols // m, m)
        order = torch.argsort(g, dim=2, stable=True)
        ranks = torch.empty_like(order).scatter_(2, order, torch.arange(m).expand_as(order).contiguous())
        return (ranks >= m - n).reshape(rows, cols)
    if sparsity is None or not 0 <= sparsity <= 1:
        raise ValueError(f"Wanda: sparsity must be a fraction in [0, 1], got {sparsity!r}")
    total = round(sparsity * rows * cols)
    per_row = torch.full((rows,), total // rows)
    per_row[: total % rows] += 1
    order = torch.argsort(score, dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand_as(order).contiguous())
    return ranks >= per_row[:, None]
