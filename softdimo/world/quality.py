"""A learned quality reward for the shapes world (the embedded stand-in for ImageReward).

QualityScorer is a small CNN trained as a logistic classifier: clean scenes (label 1) against
degraded ones (label 0): blur, noise, colour shifts, blockiness, patches swapped in from other
images (what wrong tokens look like), shuffled patches and canvas-filling blobs (what one-step
samples of an undistilled MDM look like). Its score is the logit: higher means cleaner.

Shapes: B batch, images [B, 3, H, W] float in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from softdimo.world.layout import seeded_init

DEGRADATIONS = ("blur", "noise", "colour", "blocky", "patch_swap", "patch_shuffle", "blob")
PATCH = 4


class ConvTrunk(nn.Module):
    """32×32 -> 4×4 by three stride-2 convolutions (GroupNorm + SiLU), then global average and max
    pooling concatenated, [B, 3, H, W] -> [B, 8·width]. Max pooling answers "is there any red
    pixel" directly, which average pooling over a mostly empty canvas dilutes."""

    def __init__(self, width: int):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width, 4 * width]
        strides = [1, 2, 1, 2, 2]
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3 if stride == 1 else 4, stride=stride, padding=1),
                       nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = 8 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


class QualityScorer(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.trunk = ConvTrunk(width)
        self.head = nn.Linear(self.trunk.out_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> score [B] (the real-vs-degraded logit)."""
        return self.head(self.trunk(2 * images - 1)).squeeze(-1)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator
             ) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


def _blur(x: torch.Tensor, times: int, kernel: int = 3) -> torch.Tensor:
    for _ in range(times):
        x = F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return x


def _patches(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, P, 3·PATCH²] non-overlapping patches."""
    return F.unfold(x, PATCH, stride=PATCH).transpose(1, 2)


def _unpatch(p: torch.Tensor, size: int) -> torch.Tensor:
    return F.fold(p.transpose(1, 2), size, PATCH, stride=PATCH)


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random degradation of random strength per image: x [B, 3, H, W] -> [B, 3, H, W]."""
    b, _, h, _ = x.shape
    kind = torch.randint(0, len(DEGRADATIONS), (b,), generator=generator)
    strength = _uniform((b, 1, 1, 1), 0.5, 1.0, generator)
    out = torch.empty_like(x)

    blurred = _blur(x, int(torch.randint(1, 4, (1,), generator=generator)))
    noise = x + _uniform((b, 1, 1, 1), 0.04, 0.25, generator) * torch.randn(
        x.shape, generator=generator)
    colour = x * _uniform((b, 3, 1, 1), 0.5, 1.5, generator) + _uniform(
        (b, 3, 1, 1), -0.2, 0.2, generator)
    factor = 2 ** int(torch.randint(1, 3, (1,), generator=generator))
    blocky = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")

    patches = _patches(x)                                            # [B, P, 3·PATCH²]
    n_p = patches.shape[1]
    swap = torch.rand(b, n_p, 1, generator=generator) < _uniform((b, 1, 1), 0.1, 0.5, generator)
    donor = patches[torch.randint(0, b, (b, n_p), generator=generator),
                    torch.randint(0, n_p, (b, n_p), generator=generator)]
    patch_swap = _unpatch(torch.where(swap, donor, patches), h)
    order = torch.rand(b, n_p, generator=generator).argsort(dim=1)
    shuffled = torch.gather(patches, 1, order[..., None].expand_as(patches))
    patch_shuffle = _unpatch(torch.where(swap, shuffled, patches), h)
    # a blob: strong blur, then a contrast stretch that smears colour over a large region
    wide = _blur(x, 3, kernel=5)
    blob = ((wide - wide.amin(dim=(2, 3), keepdim=True)) * _uniform((b, 1, 1, 1), 2.0, 5.0,
                                                                   generator))

    variants = (x + strength * (blurred - x), noise, colour, blocky, patch_swap, patch_shuffle,
                blob)
    for k, v in enumerate(variants):
        sel = kind == k
        out[sel] = v[sel]
    return out.clamp(0, 1)


def train_quality(images: torch.Tensor, steps: int, batch_size: int, lr: float,
                  generator: torch.Generator, progress: bool = True, width: int = 16
                  ) -> tuple[QualityScorer, dict]:
    """Logistic training on clean images (uint8 [N, 3, H, W]) vs degrade(...) -> (model, stats)."""
    with seeded_init(generator):
        model = QualityScorer(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    half = batch_size // 2
    target = torch.cat([torch.ones(half), torch.zeros(half)])
    losses, accs = [], []
    for _ in tqdm(range(steps), desc="quality", disable=not progress, leave=False):
        idx = torch.randint(0, images.shape[0], (2 * half,), generator=generator)
        x = images[idx].float() / 255
        x = torch.cat([x[:half], degrade(x[half:], generator)])
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append(((logits > 0).float() == target).float().mean().item())
    model.eval().requires_grad_(False)
    tail = slice(-min(50, steps), None)
    return model, {"loss": sum(losses[tail]) / len(losses[tail]),
                   "train_accuracy": sum(accs[tail]) / len(accs[tail])}
