"""Token shards: D_d as memory-mapped safetensors files plus a manifest (``orchestrator.tokenize``
writes them, ``data.tokens`` reads them).

A folder holds ``manifest.json``, ``shard-XXXXX.safetensors`` files and, for captioned inputs,
``captions.txt``. Shard s covers the input items [s·S, (s+1)·S) (S = ``shard_items``), so a finished
shard is known by its file alone and a resumed run skips it. Each shard stores

- ``tokens`` [n, L]: the teacher's ids, int16 when V ≤ 32767 (1M × 4096 tokens = 8 GB), else int32;
- ``index`` [n] int64: each row's position in the input list (row r's caption is line index[r] of
  captions.txt); ``labels`` [n] int64: class ids (-1 for uncaptioned class-free inputs);

and, in its safetensors metadata, ``items`` (inputs covered), ``bad`` (inputs that failed to
decode), ``errors`` (a few of those, JSON) and the id range ``min``/``max``. Rows of items that
failed are simply absent. ``TokenShards`` maps every shard's ``tokens`` with ``numpy.memmap`` (no
copy in RAM); indexing gathers only the rows asked for.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

FORMAT = "softdimo-token-shards/1"
MANIFEST = "manifest.json"
CAPTIONS = "captions.txt"
_DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


class ShardError(ValueError):
    """A manifest or shard that cannot be read; the message names the file."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def token_dtype(vocab: int) -> torch.dtype:
    return torch.int16 if vocab <= 32767 else torch.int32


def write_shard(folder: Path, shard: int, tokens: np.ndarray, index: np.ndarray, labels: np.ndarray,
                items: int, bad: int, errors: Sequence[str], vocab: int, seq_len: int) -> dict:
    """Write shard ``shard`` (tokens [n, seq_len], index [n], labels [n]) atomically (temporary
    file, then rename); returns its manifest record. n may be 0 (every item of the shard was bad)."""
    from safetensors.torch import save_file

    tokens = torch.as_tensor(np.asarray(tokens)).reshape(len(index), seq_len).to(token_dtype(vocab))
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, -1)
    meta = {"items": str(items), "bad": str(bad), "errors": json.dumps(list(errors)[:5]),
            "min": str(lo), "max": str(hi)}
    path = Path(folder) / shard_name(shard)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"tokens": tokens.contiguous(), "index": torch.as_tensor(np.asarray(index), dtype=torch.int64),
               "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64)}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return shard_record(path)


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of ``path`` and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise ShardError(f"{path}: not a readable safetensors shard ({err})") from None
    return header, 8 + size


def shard_record(path: Path) -> dict:
    """A finished shard's manifest record from its own metadata (how resume rebuilds the manifest)."""
    header, _ = _header(path)
    meta = header.get("__metadata__", {})
    try:
        rows = header["tokens"]["shape"][0]
        return {"file": path.name, "rows": int(rows), "items": int(meta["items"]), "bad": int(meta["bad"]),
                "errors": json.loads(meta["errors"]), "min": int(meta["min"]), "max": int(meta["max"])}
    except (KeyError, ValueError, IndexError) as err:
        raise ShardError(f"{path}: shard metadata lacks {err}") from None


def _memmap(path: Path, name: str) -> np.ndarray:
    header, start = _header(path)
    if name not in header:
        raise ShardError(f"{path}: no tensor {name!r}")
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ShardError(f"{path}: {name} has dtype {info['dtype']}, expected one of {sorted(_DTYPES)}")
    shape = tuple(info["shape"])
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def resolve_manifest(path: str | Path) -> Path:
    """A manifest.json, or a folder holding one."""
    p = Path(path).expanduser()
    return p / MANIFEST if p.is_dir() else p


def is_manifest(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p.is_dir() and (p / MANIFEST).is_file()) or (p.is_file() and p.suffix == ".json")


@dataclass
class TokenShards:
    """All rows of a shard folder as one [N, L] table, memory-mapped; ``shards[i][idx]`` gathers rows."""

    manifest: dict
    folder: Path
    parts: list          # per shard: np.memmap [n_s, L]
    offsets: np.ndarray  # [S + 1] first global row of each shard
    labels: torch.Tensor     # [N] int64
    index: torch.Tensor      # [N] int64
    captions: list | None    # per row, from captions.txt (None without captions)

    @classmethod
    def open(cls, path: str | Path) -> "TokenShards":
        manifest_path = resolve_manifest(path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise ShardError(f"{manifest_path}: not a readable token manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ShardError(f"{manifest_path}: not a token manifest (format {FORMAT!r}); "
                             "make one with python -m orchestrator.tokenize")
        folder = manifest_path.parent
        parts, labels, index = [], [], []
        for rec in manifest["shards"]:
            file = folder / rec["file"]
            if not file.is_file():
                raise ShardError(f"{manifest_path}: shard {file} is missing")
            tokens = _memmap(file, "tokens")
            if tokens.ndim != 2 or tokens.shape[1] != manifest["seq_len"]:
                raise ShardError(f"{file}: tokens {list(tokens.shape)}, expected [n, {manifest['seq_len']}]")
            parts.append(tokens)
            labels.append(np.asarray(_memmap(file, "labels")))
            index.append(np.asarray(_memmap(file, "index")))
        sizes = [p.shape[0] for p in parts]
        captions = None
        if manifest.get("captions"):
            lines = (folder / manifest["captions"]).read_text(encoding="utf-8").split("\n")
            idx = np.concatenate(index) if index else np.zeros(0, np.int64)
            captions = [lines[i] for i in idx.tolist()]
        cat = (lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64)) if xs
               else torch.zeros(0, dtype=torch.long))
        return cls(manifest, folder, parts, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   cat(labels), cat(index), captions)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), int(self.manifest["seq_len"])

    def __len__(self) -> int:
        return self.shape[0]

    def id_range(self) -> tuple[int, int]:
        """(min, max) id over all shards, from their metadata (no scan)."""
        recs = [r for r in self.manifest["shards"] if r["rows"]]
        return (min(r["min"] for r in recs), max(r["max"] for r in recs)) if recs else (0, -1)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        """Rows ``idx`` (int, slice, or an index tensor/array) -> long tensor [len(idx), L]."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        rows = np.atleast_1d(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)})")
        out = np.empty((rows.size, self.shape[1]), dtype=np.int64)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.parts[s][rows[sel] - self.offsets[s]]
        return torch.from_numpy(out)
