"""The GPU suite's report: ``results.json`` (everything measured) and ``report.md`` (the tables).

``write(folder, results)`` is called after every stage, so a run cut short still leaves what it
measured. The Markdown reads the targets of issue 13 next to the figures: joint-step MFU >= 40%
(MaskGit, MaskBit, MaskGen), joint/Di[M]O-only time <= 1.1x the FLOP ratio, our FID path >= 2x
clean-fid's folder mode with |ΔFID| <= 1e-3.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MFU_TARGET = 0.40
MFU_FAMILIES = ("maskgit", "maskbit", "maskgen")
TIME_OVER_FLOP_TARGET = 1.1


def _f(value: Any, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:{spec}}{suffix}"


def _gib(value: Any) -> str:
    return _f(value, ".1f", 1 / 2 ** 30, " GiB")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def step_rows(steps: list[dict]) -> list[str]:
    head = ["| family | variant | batch (Table 5 / 4) | s/step | images/s | peak memory | TFLOP/step | "
            "TFLOP/s | MFU | MFU target |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for fam in steps:
        if "error" in fam:
            rows.append(f"| {fam['family']} | error | | | | | | | | {fam['error']} |")
            continue
        for key in ("dimo_only", "joint"):
            v = fam[key]
            if not v.get("batch"):
                rows.append(f"| {fam['family']} | {key} | 0 of {v['requested_batch']}: "
                            f"out of memory even at batch 1 | | | | | | | |")
                continue
            batch = str(v["batch"]) + ("" if v["fits"] else
                                       f" (requested {v['requested_batch']} did not fit)")
            target = ""
            if key == "joint" and fam["family"] in MFU_FAMILIES:
                target = _verdict(None if v["mfu"] is None else v["mfu"] >= MFU_TARGET)
            rows.append(f"| {fam['family']} | {key} | {batch} | {_f(v['seconds_per_step'], '.4f')} | "
                        f"{_f(v['images_per_second'], '.1f')} | {_gib(v['peak_memory_bytes'])} | "
                        f"{_f(v['flops_per_step'], '.2f', 1e-12)} | {_f(v['tflops_per_second'], '.1f')} | "
                        f"{_f(v['mfu'], '.1%')} | {target} |")
    return head + rows


def ratio_rows(steps: list[dict]) -> list[str]:
    head = ["| family | joint / Di[M]O-only time | FLOP ratio | time / FLOP ratio | target <= 1.1 |",
            "|---|---|---|---|---|"]
    rows = []
    for fam in steps:
        if "time_ratio" not in fam:
            continue
        ok = fam["time_over_flop_ratio"] <= TIME_OVER_FLOP_TARGET
        rows.append(f"| {fam['family']} | {fam['time_ratio']:.2f}x | {fam['flop_ratio']:.2f}x | "
                    f"{fam['time_over_flop_ratio']:.2f} | {_verdict(ok)} |")
    return head + rows


def profile_lines(steps: list[dict]) -> list[str]:
    """Per profiled family: host syncs per step and the ops with the largest share of device time."""
    lines = []
    for fam in steps:
        prof = (fam.get("joint") or {}).get("profile")
        if not prof:
            continue
        ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["top_ops"][:5])
        lines.append(f"- {fam['family']} (`{prof['table']}`): {prof['host_syncs_per_step']} host syncs "
                     f"per step; top ops by {prof['time_key']}: {ops}")
    return (["Profile of one joint step (torch.profiler, not timed):", ""] + lines + [""]) if lines else []


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU suite: {results.get('mode', '?')} run", "",
             f"- device: {env.get('device', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}",
             f"- started {results.get('started', '?')}, wall time {_f(results.get('wall_seconds'), '.0f')} s",
             f"- command: `{results.get('command', '')}`", ""]
    tests = results.get("tests")
    if tests:
        lines += ["## 1. CUDA test tier", "",
                  f"`{tests['command']}`: {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['skipped']} skipped, {tests['errors']} errors in {tests['seconds']:.0f} s "
                  f"(exit code {tests['returncode']}).", ""]
        if tests.get("failures"):
            lines += [f"- FAILED {name}" for name in tests["failures"]] + [""]
    steps = results.get("steps")
    if steps:
        lines += ["## 2. Training step per teacher family", "",
                  f"{steps[0].get('weights', '')}. bf16 autocast (the trainer's `precision: auto` on CUDA); "
                  "FLOPs from `torch.utils.flop_counter` over one whole step (θ, ψ and discriminator "
                  "updates); MFU against the GPU's dense bf16 peak.", ""]
        lines += step_rows(steps) + [""] + ratio_rows(steps) + [""] + profile_lines(steps)
    fid = results.get("fid")
    if fid:
        if "error" in fid:
            lines += ["## 3. FID feature throughput", "", f"error: {fid['error']}", ""]
        else:
            ok = fid["ratio_wall"] >= fid["target_ratio"] and fid["abs_delta_fid"] <= fid["target_abs_delta_fid"]
            lines += ["## 3. FID feature throughput", "",
                      f"{fid['num_per_set']} + {fid['num_per_set']} images at {fid['size']} px, "
                      f"{fid['feature_dims']} pool3 features, {fid['weights']}.", "",
                      "| path | images/s | wall s | FID |", "|---|---|---|---|",
                      f"| ours (uint8 tensors, batch {fid['project']['batch']}) | "
                      f"{fid['project']['images_per_second']:.1f} | {fid['project']['wall_seconds']:.1f} | "
                      f"{fid['project']['fid']:.6f} |",
                      f"| clean-fid folder mode (batch {fid['cleanfid']['batch']}, "
                      f"{fid['cleanfid']['workers']} workers) | {fid['cleanfid']['images_per_second']:.1f} | "
                      f"{fid['cleanfid']['wall_seconds']:.1f} | {fid['cleanfid']['fid']:.6f} |", "",
                      f"Ratio {fid['ratio_wall']:.2f}x (target >= 2x), |ΔFID| = {fid['abs_delta_fid']:.3g} "
                      f"(target <= 1e-3): {_verdict(ok)}.", ""]
            if fid.get("workers_fallback"):
                lines += [f"Note: {fid['workers_fallback']}.", ""]
    sweep = results.get("sweep")
    if sweep:
        lines += ["## 4. Embedded-world sweep on one GPU", ""]
        lines += [f"- {k}: {v}" for k, v in sweep.items() if k not in ("output_tail", "traceback")] + [""]
    skipped = results.get("skipped")
    if skipped:
        lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def write(folder: str | Path, results: dict) -> tuple[Path, Path]:
    """Write results.json and report.md under ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "results.json", folder / "report.md"
    js.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    md.write_text(markdown(results))
    return js, md
