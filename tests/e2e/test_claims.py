"""The claims command end to end at toy size: both claims sweeps (students, arms, 2 seeds) on the test
world, the teacher's references, and the page with every claim; real Ray and MLflow, no timings."""
import json

import pytest

from orchestrator import claims, source, tracking
from orchestrator.claims_page import CLAIMS, NOT_REPRODUCED, REPRODUCED, TOO_FEW, WITHIN_NOISE
from orchestrator.sweeping.layout import SweepLayout
from tests.e2e.test_sweep import ray_session  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
VERDICTS = (REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, TOO_FEW)


def test_the_claims_command_renders_every_claim_with_its_seeds(tmp_path, ray_session):
    out = tmp_path / "page"
    args = ["world.spec=test", "train.steps=2", "sweep.student.overrides.train.steps=1",
            "train.checkpoint_every=1", "train.log_every=1", "train.grid_size=4", "train.batch_size=8",
            "sweep.search.seed={grid: [0, 1]}", "sweep.evaluation.num_images=16",
            "sweep.evaluation.cpus_per_actor=0.25", "sweep.evaluation.geneval_prompts_per_task=1",
            "sweep.evaluation.images_per_prompt=1", "sweep.evaluation.test_time.bon=2",
            "sweep.evaluation.test_time.iters=2", f"sweep.output_dir={tmp_path}",
            f"sweep.tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--out", str(out), "--quiet"]
    assert claims.main(args) == 0
    page = (out / "claims.md").read_text()
    for claim in CLAIMS:
        section = page.split(f"## Claim {claim.key}: ")[1].split("## Claim")[0]
        assert claim.paper in section and (out / f"claim_{claim.key}.png").is_file()
        assert any(f"Verdict: **{v}**" in section for v in VERDICTS)
        assert "(n=2)" in section
        if any(check.ref.kind == "teacher" for check in claim.checks):
            assert "teacher, 16 steps" in section
    assert page.count("(seeds 0, 1)") == 2 and "python -m orchestrator.claims world.spec=test" in page
    for name in ("claims_c2i", "claims_t2i"):
        # the late checkpoints the files ask for: each arm's two steps (one for the 1-step students)
        state = json.loads((tmp_path / name / "sweep.json").read_text())
        for trial in state["trials"] + state["students"]:
            log = SweepLayout(tmp_path / name).trial(trial["key"]).eval_log
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
            assert sorted(steps) == ([1] if trial in state["students"] else [1, 2]), (name, trial["key"])
        refs = json.loads((tmp_path / name / "teacher.json").read_text())["steps"]
        assert set(refs) == {"1", "16"}
        # each reference carries its evaluation's SE, which the verdicts count (claims e, f: GenEval)
        se = "eval/world_fid_se" if name == "claims_c2i" else "eval/geneval_world_se"
        assert all(refs[k][se] >= 0 for k in refs), (name, refs)
        assert f"run on `{source.commit()}`" in page
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        parent = tracking.find_parent(uri, "softdimo", name)
        names = {a.path for a in tracking._client(uri).list_artifacts(parent.info.run_id, "claims")}
        assert "claims/claims.md" in names and "claims/claim_a.png" in names
    # once more: everything finished, the references are cached; the page comes out the same
    mtime = (tmp_path / "claims_c2i" / "teacher.json").stat().st_mtime
    assert claims.main(args) == 0
    assert (tmp_path / "claims_c2i" / "teacher.json").stat().st_mtime == mtime
