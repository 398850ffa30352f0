"""Golden numbers: the first iterations' losses on the test world, pinned.

A change meant to keep behaviour (a refactor, a speed-up) must leave these numbers where they are; a
change meant to move them (a new loss term, another warm-up) regenerates them on purpose with
``python tests/unit/test_golden_losses.py`` and says so in its commit. The tolerance allows for
another CPU's float summation order, not for a changed computation.
"""
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
# Metrics that depend on the math of one iteration; timings and counters are left out.
PREFIXES = ("loss/", "grad_norm/", "disc/", "reward/", "diag/teacher_aux_kl")

# Regenerated 2026-12-06 (first version).
GOLDEN = {'tiny_c2i.yaml': [{'diag/teacher_aux_kl': 2.651673725040382e-08,
                    'disc/fake_logit': 0.03251630440354347,
                    'disc/real_logit': 0.03213418647646904,
                    'grad_norm/auxiliary': 0.3096839189529419,
                    'grad_norm/discriminator': 0.05266556516289711,
                    'grad_norm/generator': 0.05100727081298828,
                    'loss/auxiliary': 4.861882209777832,
                    'loss/dimo': 3.3698361878720107e-09,
                    'loss/discriminator': 1.386747121810913,
                    'loss/gan_generator': 0.6767345666885376,
                    'loss/total': 67.67345428466797},
                   {'diag/teacher_aux_kl': 3.201944309694227e-08,
                    'disc/fake_logit': 0.031547412276268005,
                    'disc/real_logit': 0.03127804026007652,
                    'grad_norm/auxiliary': 0.30316266417503357,
                    'grad_norm/discriminator': 0.05184280499815941,
                    'grad_norm/generator': 0.05359230935573578,
                    'loss/auxiliary': 4.834471702575684,
                    'loss/dimo': 8.282103003409702e-09,
                    'loss/discriminator': 1.3866759538650513,
                    'loss/gan_generator': 0.6771718859672546,
                    'loss/total': 67.7171859741211},
                   {'diag/teacher_aux_kl': 1.0702307662313615e-07,
                    'disc/fake_logit': 0.030516183003783226,
                    'disc/real_logit': 0.029886972159147263,
                    'grad_norm/auxiliary': 0.3077651560306549,
                    'grad_norm/discriminator': 0.055830370634794235,
                    'grad_norm/generator': 0.04835519194602966,
                    'loss/auxiliary': 4.865120887756348,
                    'loss/dimo': 2.96221625006865e-08,
                    'loss/discriminator': 1.386837363243103,
                    'loss/gan_generator': 0.6784033179283142,
                    'loss/total': 67.84033203125}],
 'tiny_t2i.yaml': [{'diag/teacher_aux_kl': 1.2457959996936552e-07,
                    'grad_norm/auxiliary': 0.30812495946884155,
                    'grad_norm/generator': 0.008882986381649971,
                    'loss/auxiliary': 4.8544793128967285,
                    'loss/dimo': 4.082077609268708e-08,
                    'loss/reward': 0.33154961466789246,
                    'loss/total': 0.0033155367709696293,
                    'reward/clip': 0.1408025324344635,
                    'reward/quality': -0.35971012711524963},
                   {'diag/teacher_aux_kl': 1.6962015081389836e-07,
                    'grad_norm/auxiliary': 0.317271888256073,
                    'grad_norm/generator': 0.010429376736283302,
                    'loss/auxiliary': 4.847324848175049,
                    'loss/dimo': 5.7438803935383476e-08,
                    'loss/reward': 0.3319931924343109,
                    'loss/total': 0.003319989424198866,
                    'reward/clip': 0.13650374114513397,
                    'reward/quality': -0.35929393768310547},
                   {'diag/teacher_aux_kl': 2.4157347411346564e-07,
                    'grad_norm/auxiliary': 0.27295196056365967,
                    'grad_norm/generator': 0.013634779490530491,
                    'loss/auxiliary': 4.8490118980407715,
                    'loss/dimo': 9.145206547600537e-08,
                    'loss/reward': 0.3326893746852875,
                    'loss/total': 0.0033269852865487337,
                    'reward/clip': 0.13477621972560883,
                    'reward/quality': -0.3596446216106415}]}


def first_iterations(preset: str, out: Path) -> list[dict]:
    """Metrics of iterations 1..STEPS of ``preset`` on the test world, every term switched on."""
    from orchestrator.config import load_config, to_dict
    from trainers.loop import Hooks, train

    cfg = load_config(ROOT / "sweeps/presets" / preset,
                      ["world.spec=test", f"train.steps={STEPS}", "train.batch_size=8",
                       "train.log_every=1", "train.grid_size=4", f"train.checkpoint_every={STEPS}",
                       f"output_dir={out}", "train.device=cpu"])
    seen: list[dict] = []

    def on_metrics(step: int, metrics: dict) -> None:
        if step <= STEPS and not any(k.startswith("eval/") for k in metrics):
            seen.append({k: float(v) for k, v in sorted(metrics.items()) if k.startswith(PREFIXES)})

    train(cfg, to_dict(cfg), hooks=Hooks(on_metrics=on_metrics), progress=False)
    return [m for m in seen if m]


def close(got: float, want: float) -> bool:
    # loss/dimo and the teacher-auxiliary KL start near 1e-8 (student and auxiliary are copies of
    # the teacher): there only the absolute size is meaningful across CPUs.
    return math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7)


@pytest.mark.parametrize("preset", ["tiny_c2i.yaml", "tiny_t2i.yaml"])
def test_first_iterations_match_the_golden_numbers(preset, test_world, tmp_path):
    got = first_iterations(preset, tmp_path)
    want = GOLDEN[preset]
    assert [sorted(m) for m in got] == [sorted(m) for m in want], "metric names changed"
    for step, (g, w) in enumerate(zip(got, want), start=1):
        bad = {k: (g[k], w[k]) for k in w if not close(g[k], w[k])}
        assert not bad, f"iteration {step}: (got, golden) {bad}"


if __name__ == "__main__":      # regenerate: prints the GOLDEN dict to paste above
    import os
    import pprint
    import tempfile

    import torch

    from softdimo.world.store import load_world

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cache = Path(os.environ.setdefault("SOFTDIMO_CACHE", tempfile.mkdtemp()))
    load_world("test", cache, build_if_missing=True, progress=False)
    table = {p: first_iterations(p, Path(tempfile.mkdtemp())) for p in ("tiny_c2i.yaml", "tiny_t2i.yaml")}
    pprint.pprint(table, width=100, stream=sys.stdout)
