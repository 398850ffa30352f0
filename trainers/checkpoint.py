"""Checkpoints: a directory per step, written atomically, loaded without unpickling anything.

Layout of ``<output_dir>/checkpoints/step_00000300/``:
- ``generator.safetensors``, ``ema.safetensors``, ``auxiliary.safetensors``, ``discriminator.safetensors``
- ``optim.safetensors`` + ``optim.json``: optimizer and scheduler states (tensors / everything else)
- ``rng.safetensors``: the run's generator state (one per data-parallel rank) and torch's global RNG
- ``meta.json``: step, images seen, config hash, the resolved config, the world it ran on, and the
  sha256 of every other file (``files``)

The directory is written under a temporary name and renamed, so a crash never leaves a half
checkpoint behind; ``latest_checkpoint`` only considers directories that contain ``meta.json``.
Damage after that (a truncated copy, flipped bytes, a lost file) is caught by ``verify_checkpoint``:
resuming falls back to the newest checkpoint that verifies, generation refuses a damaged one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from trainers import distributed as dist
from trainers.state import TrainState

META = "meta.json"
PREFIX = "step_"
REQUIRED = ("generator.safetensors", "ema.safetensors", "optim.safetensors", "optim.json",
            "rng.safetensors")   # present in every checkpoint, whatever the run's modules


class CheckpointDamaged(ValueError):
    """A checkpoint whose meta.json cannot be read or whose files do not match their checksums."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(name: str, sd: dict, tensors: dict) -> dict:
    """Split an optimizer state dict into tensors (into ``tensors``) and a JSON-able rest."""
    state_meta = {}
    for idx, entry in sd["state"].items():
        state_meta[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{idx}/{key}"] = value.detach().contiguous().cpu()
                state_meta[str(idx)][key] = {"tensor": True}
            else:
                state_meta[str(idx)][key] = {"value": value}
    return {"state": state_meta, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(name: str, meta: dict, tensors: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {key: (tensors[f"{name}/{idx}/{key}"] if spec.get("tensor") else spec["value"])
                           for key, spec in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rank_rng_states(st: TrainState) -> list[torch.Tensor]:
    """Every rank's data/noise generator state (a collective under torch.distributed)."""
    state = st.rng.get_state()
    device = next(st.generator.parameters()).device
    return [s.cpu() for s in dist.gather_tensors(state.to(device))]


def save_checkpoint(st: TrainState, output_dir: str | Path, meta: dict, keep: int = 2,
                    rng_states: list[torch.Tensor] | None = None) -> Path | None:
    """Write step ``st.step`` atomically; prune to the newest ``keep`` checkpoints.

    Only rank 0 writes (other ranks get None). ``rng_states`` are the per-rank generator states of a
    data-parallel run, so that every rank resumes its own data stream.
    """
    if not dist.is_main():
        return None
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(st.step)
    tmp = root / f".tmp_{checkpoint_dir_name(st.step)}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in st.modules().items():
        save_module(module, tmp / f"{name}.safetensors")
    tensors, optim_meta = {}, {"optimizers": {}, "schedulers": {}}
    for name, opt in st.optimizers.items():
        optim_meta["optimizers"][name] = _flatten_optimizer(name, opt.state_dict(), tensors)
    for name, sched in st.schedulers.items():
        sd = sched.state_dict()
        sd.pop("lr_lambdas", None)   # the warm-up lambda is rebuilt from the config
        optim_meta["schedulers"][name] = sd
    save_file(tensors, str(tmp / "optim.safetensors"))
    (tmp / "optim.json").write_text(json.dumps(optim_meta))
    rng = {"run": st.rng.get_state(), "torch": torch.get_rng_state()}
    for r, state in enumerate(rng_states or []):
        if r > 0:
            rng[f"run.rank{r}"] = state
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.name != META}
    full_meta = dict(meta, step=st.step, images_seen=st.images_seen, files=files)
    (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint (Ray Train keeps the same name)."""
    return f"{PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def latest_good_checkpoint(output_dir: str | Path) -> Path | None:
    return newest_good(list_checkpoints(output_dir))


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json; CheckpointDamaged when it is missing, truncated or not an object."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointDamaged(f"{file} cannot be read ({str(err).splitlines()[0]})") from None
    if not isinstance(meta, dict) or "step" not in meta or "config" not in meta:
        raise CheckpointDamaged(f"{file} is not a softdimo checkpoint's meta.json")
    return meta


def verify_checkpoint(path: str | Path, only: Sequence[str] | None = None) -> dict:
    """The meta of a checkpoint whose files (or the ``only`` ones, e.g. ``ema.safetensors`` for
    generation) match the sha256 recorded at saving; CheckpointDamaged naming the first bad file.
    Checkpoints from before checksums were recorded are only checked for the files' presence."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict):
        files = {n: None for n in (only or REQUIRED)}
    wanted = files if only is None else {n: files.get(n, "absent from meta.json") for n in only}
    for name, digest in wanted.items():
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"{file} is missing")
        if digest is not None and file_sha256(file) != digest:
            raise CheckpointDamaged(f"{file} does not match its checksum in {META} (damaged or replaced)")
    return meta


def newest_good(candidates: Iterable[Path], only: Sequence[str] | None = None) -> Path | None:
    """The newest of ``candidates`` (oldest first) that verifies; one warning line per skipped one."""
    for path in reversed(list(candidates)):
        try:
            verify_checkpoint(path, only)
            return path
        except CheckpointDamaged as err:
            print(f"warning: skipping damaged checkpoint: {err}", file=sys.stderr)
    return None


def save_module(module: torch.nn.Module, file: Path) -> None:
    """A module's state dict as safetensors. Tied weights (e.g. MaskGen's LM head, which is its
    embedding table) are stored once; the other names are recorded as aliases in the metadata."""
    sd, aliases, seen = {}, {}, {}
    for key, value in module.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()))
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        sd[key] = value.detach().contiguous().cpu()
    save_file(sd, str(file), metadata={"aliases": json.dumps(aliases)} if aliases else None)


def load_weights(path: str | Path, name: str, device: torch.device | str = "cpu") -> dict:
    """One module's state dict from ``<path>/<name>.safetensors`` (no pickle), aliases restored."""
    from safetensors import safe_open

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: not a softdimo checkpoint directory")
    try:
        state = load_file(str(file), device=str(device))
        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as err:  # safetensors reports a bad header or a short file in several types
        raise CheckpointDamaged(f"{file} is not a readable safetensors file "
                                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    state.update({alias: state[kept] for alias, kept in aliases.items()})
    return state


def load_checkpoint(st: TrainState, path: str | Path) -> dict:
    """Restore every part of ``st`` from a checkpoint directory; returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    device = next(st.generator.parameters()).device
    for name, module in st.modules().items():
        module.load_state_dict(load_weights(path, name, device), strict=True)
    tensors = load_file(str(path / "optim.safetensors"), device=str(device))
    optim_meta = json.loads((path / "optim.json").read_text())
    for name, opt in st.optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(name, optim_meta["optimizers"][name], tensors))
    for name, sched in st.schedulers.items():
        sd = dict(optim_meta["schedulers"][name])
        sd["lr_lambdas"] = [None] * len(sched.lr_lambdas)
        sched.load_state_dict(sd)
    rng = load_file(str(path / "rng.safetensors"))
    r = dist.rank()
    if r == 0:
        st.rng.set_state(rng["run"])
    elif f"run.rank{r}" in rng:
        st.rng.set_state(rng[f"run.rank{r}"])
    else:   # resumed with more ranks than were saved: a fresh stream for this rank and step
        st.rng.manual_seed(dist.rank_seed(int(meta["config"].get("seed", 0))) + int(meta["step"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    st.step = int(meta["step"])
    st.images_seen = int(meta["images_seen"])
    return meta


def load_generator(teacher, path: str | Path, device: torch.device | str = "cpu",
                   name: str = "ema") -> torch.nn.Module:
    """The one-step generator of a checkpoint (EMA weights by default), in eval mode."""
    net = teacher.make_student().to(device)
    net.load_state_dict(load_weights(path, name, device), strict=True)
    return net.eval().requires_grad_(False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's newest checkpoint."""
    p = Path(path)
    if (p / META).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {META} or checkpoints/{PREFIX}*/)")
    return latest


def init_from(st: TrainState, path: str | Path, teacher_kind: str, world_spec: str) -> dict:
    """Start θ and its EMA from another run's EMA weights and ψ from its ψ (InitSection); returns
    what was loaded.

    The checkpoint must come from the same teacher (and embedded world): shapes alone would let a
    student of another world's teacher load and silently train on the wrong tokens.
    """
    path = resolve_checkpoint(path)
    meta = verify_checkpoint(path, ["ema.safetensors", "auxiliary.safetensors"])
    source = meta.get("config", {})
    theirs = (source.get("teacher", {}).get("kind"), source.get("world", {}).get("spec"))
    if theirs[0] != teacher_kind or (teacher_kind.startswith("world_") and theirs[1] != world_spec):
        raise ValueError(f"init.checkpoint: {path} was trained on teacher {theirs[0]!r} "
                         f"(world {theirs[1]!r}), this run uses {teacher_kind!r} (world {world_spec!r})")
    device = next(st.generator.parameters()).device
    # θ starts from the source's EMA, not its raw θ: the paper fine-tunes "the provided one-step
    # generator in Di[M]O" (Sec. 4.2), which is Di[M]O's EMA model (dimo.md §7.2). The EMA is far
    # ahead of the raw θ of a short run (world-FID 63 vs 79 at step 800, LOG.md 2026-12-07), and
    # the restarted decay warm-up would otherwise replace it with the raw θ within a few steps.
    ema = load_weights(path, "ema", device)
    st.generator.load_state_dict(ema, strict=True)
    st.ema.load_state_dict(ema, strict=True)
    st.auxiliary.load_state_dict(load_weights(path, "auxiliary", device), strict=True)
    return {"checkpoint": str(path.resolve()), "step": int(meta["step"]), "generator": "ema",
            "config_hash": meta.get("config_hash", "")}
