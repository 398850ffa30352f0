"""Reading weights safely and loading them strictly (shared by teacher adapters and scorers).

Nothing here unpickles arbitrary objects: safetensors files are read as tensors, anything else with
``torch.load(weights_only=True)``. ``load_strict`` refuses a checkpoint whose keys or shapes differ
from the network built from code, and says which keys, instead of loading half of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


class WeightsFileError(RuntimeError):
    """A weights file that cannot be used: unreadable, or not fitting its network. One line."""


class StateDictMismatch(WeightsFileError):
    """A checkpoint's keys or shapes do not fit the network built from code."""


class WeightsUnreadable(WeightsFileError):
    """Not a safetensors file or a tensors-only torch file (a pickle of objects is refused unrun)."""


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def read_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A flat name -> tensor dict from a .safetensors file, or from a torch file (.pt/.pth/.bin/.ckpt)
    through ``torch.load(weights_only=True)`` (nested dicts of tensors are returned as stored)."""
    import pickle
    import warnings

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        with warnings.catch_warnings():   # "Detected pickle protocol 4": the refusal below says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsUnreadable(f"{path}: holds objects other than tensors and plain containers; "
                                "it is refused, not unpickled") from None
    except Exception as err:  # safetensors, unpickler and zip errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "safetensors" if path.suffix == ".safetensors" else "tensors-only torch"
        raise WeightsUnreadable(f"{path}: not a readable {kind} file ({first[:200]})") from None


TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def check_weight_paths(paths: Mapping[str, str | Path]) -> None:
    """Read each explicitly given weights file (key -> path) once, before any work, so that a
    damaged or planted one stops a run early, naming its key. Folders and other files are skipped."""
    for key, path in paths.items():
        path = Path(path).expanduser()
        if path.is_file() and path.suffix in TENSOR_SUFFIXES:
            try:
                read_tensors(path)
            except WeightsUnreadable as err:
                raise WeightsUnreadable(f"{key}: {err}") from None


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
