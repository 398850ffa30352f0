"""Exponential moving average of the generator, with Di[M]O's warm-up of the decay."""
from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, max_decay: float) -> float:
    """Effective decay at global step k: min(max_decay, (1 + k)/(10 + k)) (starts at 0.1)."""
    return min(float(max_decay), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: e <- d·e + (1 − d)·θ for floating parameters; other parameters and buffers copied.

    ``ema`` and ``model`` must have the same parameter and buffer names (ema is a deepcopy).
    """
    params = dict(model.named_parameters())
    ema_params = dict(ema.named_parameters())
    if params.keys() != ema_params.keys():
        raise ValueError("EMA and model parameter names differ: "
                         f"{sorted(params.keys() ^ ema_params.keys())[:5]}")
    for name, e in ema_params.items():
        p = params[name]
        if e.is_floating_point():
            e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1.0 - decay)
        else:
            e.copy_(p)
    buffers = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(buffers[name])
