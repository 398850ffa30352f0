"""Data parallelism for the training loop, in plain ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Whoever launches the ranks (Ray Train in ``orchestrator.sweeping.trial``, or torchrun) initialises the process
group; without one every function here is the identity, so a single process runs unchanged.

Why not wrap the networks in ``DistributedDataParallel``: the teacher protocol runs a network
through ``forward_embeddings`` rather than ``__call__``, so DDP's forward hooks would never fire. The
arithmetic DDP performs is reproduced directly instead: parameters start equal (broadcast from rank
0) and every rank's gradients are averaged before the optimizer step, bucketed into a few flat
all-reduces. Ranks draw different data through per-rank generators (``rank_seed``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# A large odd offset keeps the per-rank seed streams far apart; rank 0 keeps the config's seed so
# that a one-worker run is the same computation as a plain in-process run.
RANK_SEED_STRIDE = 1_000_003
BUCKET_NUMEL = 2 ** 22


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int) -> int:
    return seed + RANK_SEED_STRIDE * rank()


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, current, size = [], [], 0
    for t in tensors:
        if current and (size + t.numel() > BUCKET_NUMEL or t.dtype != current[0].dtype):
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel()
    if current:
        out.append(current)
    return out


def _all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average each tensor across ranks in place, a few flat buffers at a time."""
    n = world_size()
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(module: nn.Module) -> None:
    """Mean of every trainable parameter's gradient over the ranks (what DDP's backward does).

    A parameter without a gradient on this rank contributes zeros, so every rank issues the same
    collectives in the same order even when a loss term touched different parameters.
    """
    if not active():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_mean_([p.grad for p in params])


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def mean_metrics(metrics: dict, device: torch.device) -> dict:
    """Average float metrics over the ranks (same keys on every rank, in any order)."""
    if not active() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= world_size()
    return dict(zip(keys, values.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps ranks in step when one must stop)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def max_parameter_spread(modules: list[nn.Module], device: torch.device) -> float:
    """Largest |difference| of any parameter between any two ranks (0.0 when in sync)."""
    if not active():
        return 0.0
    spread = torch.zeros((), dtype=torch.float64, device=device)
    for module in modules:
        for p in module.parameters():
            hi, lo = p.detach().double().clone(), p.detach().double().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            spread = torch.maximum(spread, (hi - lo).abs().max())
    return float(spread)


def gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (used for per-rank RNG states in checkpoints)."""
    if not active():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return out
