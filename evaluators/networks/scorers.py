"""The Scorer interface shared by every image-text scorer, and a factory by name.

A scorer maps images [B, 3, H, W] float in [0, 1] and B prompts to B scores (higher is better),
differentiably in the images, so evaluation (under ``torch.no_grad``) and reward training use the
same object. CLIP score, HPSv2/v2.1 and PickScore live in ``evaluators.networks.clip_scores``, ImageReward
in ``evaluators.networks.image_reward``; the world's stand-ins (softdimo.world) have the same call.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

SCORER_NAMES = ("clip", "hps", "hps_v21", "pickscore", "imagereward")


@runtime_checkable
class Scorer(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1], B prompts -> scores [B], differentiable."""
        ...


def _clip(device: str | torch.device, **paths: Any) -> Scorer:
    from evaluators.networks.clip_scores import ClipScorer
    return ClipScorer(device=device, **paths)


def _hps(version: str) -> Callable[..., Scorer]:
    def build(device: str | torch.device, **paths: Any) -> Scorer:
        from evaluators.networks.clip_scores import HpsScorer
        return HpsScorer(version=version, device=device, **paths)
    return build


def _pickscore(device: str | torch.device, **paths: Any) -> Scorer:
    from evaluators.networks.clip_scores import PickScorer
    return PickScorer(device=device, **paths)


def _imagereward(device: str | torch.device, **paths: Any) -> Scorer:
    from evaluators.networks.image_reward import ImageRewardScorer
    return ImageRewardScorer(device=device, **paths)


# imports stay inside the builders: transformers/open_clip load only for the scorer asked for
_BUILDERS: dict[str, Callable[..., Scorer]] = {
    "clip": _clip, "hps": _hps("v2.0"), "hps_v21": _hps("v2.1"), "pickscore": _pickscore,
    "imagereward": _imagereward,
}


def make_scorer(name: str, device: str | torch.device = "cpu", **paths: Any) -> Scorer:
    """Build scorer ``name`` on ``device``; ``paths`` go to its constructor, e.g.
    ``make_scorer("pickscore", path=..., processor=...)``, ``make_scorer("clip", path=...)``,
    ``make_scorer("imagereward", path=..., med_config=..., vocab=...)``. Paths left out are found
    under $SOFTDIMO_WEIGHTS (evaluators.networks.weights); a missing file raises WeightsMissing."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORER_NAMES)}")
    return _BUILDERS[name](device, **paths)
