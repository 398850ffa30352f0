"""The feature network behind world-FID (the embedded stand-in for Inception).

FeatureNet is a small CNN trained to predict scene attributes: which (shape, colour) pairs are
present (18, multi-label), which colours and which shapes are present, and the object count (1-4).
``features()`` returns the penultimate activations [B, F]; FID over them measures how well a
generator matches the world's distribution of objects, colours, counts and layouts.

Shapes: B batch, F feature width, A = 18 + 6 + 3 presence attributes, images in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from softdimo.world.quality import ConvTrunk
from softdimo.world.scenes import COLOURS, MAX_OBJECTS, SHAPES, Scene
from softdimo.world.layout import seeded_init

NUM_PAIRS = len(SHAPES) * len(COLOURS)
NUM_PRESENCE = NUM_PAIRS + len(COLOURS) + len(SHAPES)


def scene_targets(scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes -> (presence float [N, A], count index long [N] in 0..3 for 1..4 objects)."""
    presence = torch.zeros(len(scenes), NUM_PRESENCE)
    counts = torch.zeros(len(scenes), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            s, c = SHAPES.index(o.shape), COLOURS.index(o.colour)
            presence[i, s * len(COLOURS) + c] = 1
            presence[i, NUM_PAIRS + c] = 1
            presence[i, NUM_PAIRS + len(COLOURS) + s] = 1
        counts[i] = len(scene.objects) - 1
    return presence, counts


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c2i class ids [N] (one object each) -> the same targets as scene_targets."""
    n = labels.shape[0]
    presence = torch.zeros(n, NUM_PRESENCE)
    rows = torch.arange(n)
    presence[rows, labels] = 1
    presence[rows, NUM_PAIRS + labels % len(COLOURS)] = 1
    presence[rows, NUM_PAIRS + len(COLOURS) + labels // len(COLOURS)] = 1
    return presence, torch.zeros(n, dtype=torch.long)


class FeatureNet(nn.Module):
    def __init__(self, width: int = 24, feature_dim: int = 128):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.trunk = ConvTrunk(width)
        self.fc = nn.Linear(self.trunk.out_dim, feature_dim)
        self.presence = nn.Linear(feature_dim, NUM_PRESENCE)
        self.count = nn.Linear(feature_dim, MAX_OBJECTS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> penultimate activations [B, F]."""
        return F.silu(self.fc(self.trunk(2 * images - 1)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (presence logits [B, A], count logits [B, 4])."""
        h = self.features(images)
        return self.presence(h), self.count(h)


def train_features(images: torch.Tensor, presence: torch.Tensor, counts: torch.Tensor,
                   steps: int, batch_size: int, lr: float, generator: torch.Generator,
                   progress: bool = True, width: int = 24, feature_dim: int = 128
                   ) -> tuple[FeatureNet, dict]:
    """Attribute classification on images uint8 [N, 3, H, W] with targets from scene_targets."""
    with seeded_init(generator):
        model = FeatureNet(width, feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, exact, count_acc = [], [], []
    for _ in tqdm(range(steps), desc="features", disable=not progress, leave=False):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        p_logits, c_logits = model(images[idx].float() / 255)
        loss = (F.binary_cross_entropy_with_logits(p_logits, presence[idx])
                + F.cross_entropy(c_logits, counts[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        exact.append(((p_logits > 0).float() == presence[idx]).all(dim=1).float().mean().item())
        count_acc.append((c_logits.argmax(1) == counts[idx]).float().mean().item())
    model.eval().requires_grad_(False)
    tail = slice(-min(50, steps), None)

    def mean(v: list[float]) -> float:
        return sum(v[tail]) / len(v[tail])
    return model, {"loss": mean(losses), "presence_exact": mean(exact),
                   "count_accuracy": mean(count_acc)}
