"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before quantizing both."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .hooks import collect_inputs, shared_inputs


@torch.no_grad()
def smoothing_vectors(model: nn.Module, layers: list[tuple[str, nn.Linear]], calib: list[Any],
                      alpha: float) -> dict[str, np.ndarray]:
    """Per layer, the float32 vector ``s`` over input channels j:
    ``s_j = max|x_j|**alpha / max|W[:, j]|**(1 - alpha)``, clamped to [1e-4, 1e4], from the
    inputs ``calib`` gives each layer. The weight is applied as ``W * s`` (columns scaled up) and
    the input as ``x / s``. Layers fed the very same tensor (Q, K and V) share one ``s``, with
    the weight maxima taken over the group as SmoothQuant does, so an int8 kernel can quantize
    that input once for all of them."""
    amax: dict[str, torch.Tensor] = {}
    collect_inputs(model, layers, calib, lambda n, x: amax.__setitem__(
        n, torch.maximum(amax[n], x.abs().amax(0)) if n in amax else x.abs().amax(0)))
    mods = dict(layers)
    out: dict[str, np.ndarray] = {}
    for group in shared_inputs(model, layers, calib[0]):
        wmax = torch.stack([mods[n].weight.detach().abs().amax(0) for n in group]).amax(0).clamp_min(1e-8)
        xmax = torch.stack([amax[n] for n in group]).amax(0).clamp_min(1e-8)
        s = (xmax ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)
        for n in group:
            out[n] = s.float().numpy()
    return out
