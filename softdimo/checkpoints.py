"""Reading weights safely and loading them strictly (shared by teacher adapters and scorers).

Nothing here unpickles arbitrary objects: safetensors files are read as tensors, anything else with
``torch.load(weights_only=True)``. ``load_strict`` refuses a checkpoint whose keys or shapes differ
from the network built from code, and says which keys, instead of loading half of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


class StateDictMismatch(RuntimeError):
    """A checkpoint's keys or shapes do not fit the network built from code."""


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def read_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A flat name -> tensor dict from a .safetensors file, or from a torch file (.pt/.pth/.bin/.ckpt)
    through ``torch.load(weights_only=True)`` (nested dicts of tensors are returned as stored)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(str(path), map_location=map_location, weights_only=True)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                source: str) -> None:
    """Load ``state_dict`` into ``module`` after checking that keys and shapes match exactly.

    Raises StateDictMismatch naming ``source`` and listing missing keys, unexpected keys and
    shape mismatches, so a wrong checkpoint never loads half-way.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state_dict)
                    if tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise StateDictMismatch(
            f"{source} does not fit {type(module).__name__}: missing keys {_preview(missing)}, "
            f"unexpected keys {_preview(unexpected)}, shape mismatches {_preview(shapes)}")
    module.load_state_dict(state_dict, strict=True)
