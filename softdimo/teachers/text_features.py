"""Precomputed text conditions: prompts -> the condition tensors a text teacher takes, from a file.

A text teacher (aMUSEd, Meissonic, MaskGen) can run without its text encoder when every prompt it
will see was encoded beforehand (for instance on another machine): ``teacher.paths.text_features``
names a safetensors file holding ``features`` [N, T, C] (exactly what the adapter's
``encode_condition`` returns for one prompt, row by row) and, in its metadata, ``prompts``: the JSON
list of the N prompts. Include the empty prompt "" for the null condition of CFG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch


def save_text_features(path: str | Path, prompts: Sequence[str], features: torch.Tensor) -> None:
    """Write ``features`` [N, T, C] for ``prompts`` (N strings) to a safetensors file."""
    from safetensors.torch import save_file

    if features.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {features.shape[0]} feature rows")
    save_file({"features": features.contiguous().cpu()}, str(path),
              metadata={"prompts": json.dumps(list(prompts))})


class PrecomputedText:
    """Looks prompts up in a text-features file; an unknown prompt is a KeyError naming it."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "prompts" not in meta:
                raise ValueError(f"{path}: no 'prompts' metadata (write it with save_text_features)")
            self.features = f.get_tensor("features").to(device)
        self.path = Path(path)
        self.index = {p: i for i, p in enumerate(json.loads(meta["prompts"]))}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> [B, T, C]."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"{self.path}: no precomputed features for {len(missing)} prompt(s), "
                           f"e.g. {missing[0]!r}")
        return self.features[[self.index[p] for p in prompts]]
