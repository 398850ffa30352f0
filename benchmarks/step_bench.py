"""One Soft-Di[M]O training step of a real teacher family, timed: the joint step vs Di[M]O alone.

    python benchmarks/step_bench.py --family maskgit                 # full size, Table 5 batch / 4
    python benchmarks/step_bench.py --family maskgen --size smoke --device cpu --steps 1

The step is the trainer's own ``trainers.steps.train_step`` (θ update with Di[M]O (+ GAN + reward
where the preset has them), ψ update, discriminator update) on the family's preset (Table 5) with
the teacher and rewards from ``benchmarks.random_teachers`` (random weights, published sizes).
"Di[M]O only" is the same preset with ``gan.weight=0 reward.weight=0``. Both are measured in the
same process, one after the other, at the same batch, so their ratio is side by side.

Per variant: seconds per step (mean over --steps after --warmup), images per second, peak CUDA
memory, FLOPs per step counted by ``torch.utils.flop_counter.FlopCounterMode`` on the first
warm-up step, and MFU = FLOPs / seconds / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
A batch that runs out of memory is halved until one fits; the result says so ("fits": false).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__":        # `python benchmarks/step_bench.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name
BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None where unknown, e.g. on the CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in BF16_PEAK.items() if k in name), None)


def step_config(bench, batch: int, device: torch.device, joint: bool, precision: str = "auto"):
    """The family's preset (Table 5) as a typed Config, with the benchmark's overrides.

    The preset's file paths are not checked: the benchmark brings its own teacher and data.
    """
    from omegaconf import OmegaConf

    from trainers.config import Config, check_values

    overrides = [f"train.batch_size={batch}", f"train.device={device.type}",
                 f"train.precision={precision}", f"output_dir={tempfile.gettempdir()}/step_bench",
                 "train.warmup_steps=0"]
    if joint:   # the steady-state joint step: past the presets' 1000-step GAN warm-up (Fig. 9/12)
        overrides += ["gan.start_step=0"]
    else:
        overrides += ["gan.weight=0", "reward.weight=0"]
    node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(bench.preset),
                           OmegaConf.from_dotlist(overrides))
    if bench.size == "smoke" and node.gan.weight > 0:
        from benchmarks.random_teachers import smoke_layers

        node.gan.layers = smoke_layers(list(node.gan.layers), bench.full_depth)
    cfg = OmegaConf.to_object(node)
    check_values(cfg)
    return cfg


def random_data(teacher, n: int, device: torch.device):
    """D_d and D_c stand-ins: n random token rows with labels (class) or prompts (text)."""
    from trainers.state import DataSource

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, teacher.V, (n, teacher.seq_len), generator=g)
    if teacher.conditioning == "class":
        labels = torch.randint(0, teacher.num_classes, (n,), generator=g)
        captions = [f"class {int(i)}" for i in labels]
    else:
        labels, captions = torch.full((n,), -1), [f"a photo of prompt {i}" for i in range(n)]
    return DataSource(tokens=tokens.to(device), labels=labels.to(device), captions=captions)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_step(cfg, ctx, st, path) -> dict[str, Any]:
    """One more step under torch.profiler: the op table (by device time) to ``path``, and a summary:
    the top ops and the host syncs (``aten::_local_scalar_dense``: ``.item()``, ``float(t)``)."""
    from torch.profiler import ProfilerActivity, profile

    from trainers.steps import train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(cfg, ctx, st)
        _sync(ctx.device)
    events = prof.key_averages()
    key = "self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=key, row_limit=40))
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:8]
    syncs = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    return {"table": path.name, "host_syncs_per_step": syncs, "time_key": key,
            "top_ops": [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in top]}


def _run(bench, cfg, device: torch.device, steps: int, warmup: int,
         profile_path=None) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from trainers.state import TrainContext, build_state
    from trainers.steps import train_step

    rewards = {t.name: bench.rewards[t.name] for t in cfg.reward.terms} if cfg.reward.weight > 0 else {}
    ctx = TrainContext(teacher=bench.teacher, data=random_data(bench.teacher, 1024, device),
                       rewards=rewards, device=device)
    st = build_state(cfg, ctx)
    try:
        # the first warm-up step is the FLOP-counted one: FLOPs do not depend on warm caches
        with FlopCounterMode(display=False) as counter:
            metrics = train_step(cfg, ctx, st)
        flops = counter.get_total_flops()
        for _ in range(warmup - 1):
            train_step(cfg, ctx, st)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(cfg, ctx, st)
        _sync(device)
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        profiled = profile_step(cfg, ctx, st, profile_path) if profile_path else None
    finally:
        del st, ctx
        _free(device)
    return {"seconds_per_step": seconds, "flops_per_step": flops, "peak_memory_bytes": peak,
            "losses": sorted(k for k in metrics if k.startswith("loss/")), "profile": profiled}


def measure(bench, batch: int, device: torch.device, joint: bool, steps: int = 3, warmup: int = 1,
            precision: str = "auto", profile_path=None) -> dict[str, Any]:
    """One variant of one family at ``batch`` (halved on out-of-memory until it fits)."""
    name, peak = bf16_peak(device)
    warmup = max(1, warmup)
    requested, tried = batch, []
    while True:
        cfg = step_config(bench, batch, device, joint, precision)
        try:
            out = _run(bench, cfg, device, steps, warmup, profile_path)
            break
        except torch.cuda.OutOfMemoryError:
            tried.append(batch)
            _free(device)
            if batch == 1:
                return {"variant": "joint" if joint else "dimo_only", "requested_batch": requested,
                        "batch": 0, "fits": False, "out_of_memory_at": tried}
            batch //= 2
    out.update({
        "variant": "joint" if joint else "dimo_only", "requested_batch": requested, "batch": batch,
        "fits": batch == requested, "out_of_memory_at": tried, "steps": steps, "warmup": warmup,
        "images_per_second": batch / out["seconds_per_step"],
        "tflops_per_second": out["flops_per_step"] / out["seconds_per_step"] / 1e12,
        "mfu": (out["flops_per_step"] / out["seconds_per_step"] / peak) if peak else None,
        "device": name, "bf16_peak_flops": peak,
        "precision": "bf16" if (precision == "bf16" or (precision == "auto" and device.type == "cuda"))
        else "fp32",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "gan_weight": cfg.gan.weight, "reward_weight": cfg.reward.weight,
    })
    return out


def family_pair(family: str, size: str, device: torch.device, batch: int | None = None,
                steps: int = 3, warmup: int = 1, profile_dir=None) -> dict[str, Any]:
    """Di[M]O-only and joint steps of one family, side by side, and their time and FLOP ratios.

    With ``profile_dir``, one extra joint step runs under torch.profiler (not timed):
    ``profile_dir/profile_<family>.txt`` and a summary under ``joint.profile``.
    """

    from benchmarks import random_teachers as rt

    start = time.perf_counter()
    rewards = _reward_names(family)
    bench = rt.build(family, size, device, rewards=rewards)
    build_s = time.perf_counter() - start
    batch = batch or rt.per_gpu_batch(family)
    dimo = measure(bench, batch, device, joint=False, steps=steps, warmup=warmup)
    path = Path(profile_dir) / f"profile_{family}.txt" if profile_dir else None
    joint = measure(bench, batch, device, joint=True, steps=steps, warmup=warmup, profile_path=path)
    out = {"family": family, "size": size, "teacher_params": bench.params, "build_seconds": build_s,
           "table5_batch": rt.TABLE5_BATCH[family], "per_gpu_batch": batch, "rewards": list(rewards),
           "dimo_only": dimo, "joint": joint, "weights": rt.NOTE}
    if dimo.get("batch") and dimo["batch"] == joint.get("batch"):
        out["time_ratio"] = joint["seconds_per_step"] / dimo["seconds_per_step"]
        out["flop_ratio"] = joint["flops_per_step"] / dimo["flops_per_step"]
        out["time_over_flop_ratio"] = out["time_ratio"] / out["flop_ratio"]
    del bench
    _free(device)
    return out


def _reward_names(family: str) -> tuple[str, ...]:
    from benchmarks import random_teachers as rt
    from omegaconf import OmegaConf

    preset = OmegaConf.load(rt.ROOT / "sweeps" / "presets" / rt.PRESETS[family])
    reward = preset.get("reward") or {}
    if not reward.get("weight"):
        return ()
    return tuple(t["name"] for t in reward.get("terms", []))


def main() -> None:
    from benchmarks import random_teachers as rt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=rt.FAMILIES, required=True)
    p.add_argument("--size", choices=("full", "smoke"), default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: Table 5's batch / 4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    print(json.dumps(family_pair(args.family, args.size, torch.device(args.device), args.batch,
                                 args.steps, args.warmup), indent=2))


if __name__ == "__main__":
    main()
