"""The claims page from plain numbers: the verdict rule (every outcome), claims, and the rendering."""
import math
import shutil

import pytest

from orchestrator.claims_page import (CLAIMS, NOT_REPRODUCED, REPRODUCED, RULE, TOO_FEW, WITHIN_NOISE, Data,
                                      Stats, combine, evaluate_claim, render, verdict)


def test_verdict_rule_each_way():
    assert verdict(3.0, 1.0, True) == REPRODUCED          # d > 2 SE
    assert verdict(-3.0, 1.0, True) == NOT_REPRODUCED     # d < -2 SE
    assert verdict(1.5, 1.0, True) == WITHIN_NOISE
    assert verdict(-2.0, 1.0, True) == WITHIN_NOISE       # the boundary is noise
    assert verdict(100.0, 0.0, False) == TOO_FEW
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, WITHIN_NOISE]) == WITHIN_NOISE
    assert combine([REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE]) == NOT_REPRODUCED
    assert combine([REPRODUCED, TOO_FEW]) == TOO_FEW
    assert "d > 2·SE" in RULE and "within noise" in RULE


def test_stats_mean_std_and_text():
    s = Stats([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0 and math.isclose(s.var_of_mean(), 1 / 3)
    assert s.text() == "2 ± 1 (n=3)"
    assert Stats([5.0]).text() == "5 (n=1)" and Stats([]).text() == "—"
    assert Stats([5.0], se_known=0.2).text() == "5 ± 0.2 (eval. SE)"


def _data(gan=(20.0, 21.0, 19.0), dimo=(50.0, 49.0, 51.0), gumbel=(20.5, 19.5, 21.5), teacher16=19.0):
    c2i = {"soft_gan": {"eval/world_fid": list(gan)}, "dimo_only": {"eval/world_fid": list(dimo)},
           "gumbel_st": {"eval/world_fid": list(gumbel)}, "mask_0": {"eval/world_fid": [30.0, 31.0, 29.0]},
           "mask_095": {"eval/world_fid": [10.0, 11.0, 9.0]}}
    t2i = {"dimo_only": {"eval/geneval_world": [0.20, 0.21, 0.22], "eval/world_clip": [0.3, 0.31, 0.29]},
           "reward": {"eval/geneval_world": [0.30, 0.31, 0.29], "eval/world_clip": [0.35, 0.36, 0.34],
                      "eval/tts/geneval_world": [0.40, 0.41, 0.39]}}
    teacher = {"c2i": {1: {"eval/world_fid": 150.0, "eval/world_fid_se": 1.0},
                       16: {"eval/world_fid": teacher16, "eval/world_fid_se": 0.3}},
               "t2i": {1: {"eval/geneval_world": 0.05}, 16: {"eval/geneval_world": 0.318}}}
    return Data(arms={"c2i": c2i, "t2i": t2i}, teacher=teacher, seeds={"c2i": [0, 1, 2], "t2i": [0, 1, 2]})


def _verdicts(data):
    return {c.key: combine([r.verdict for r in evaluate_claim(c, data)]) for c in CLAIMS}


def test_claims_come_out_each_way_from_the_numbers():
    v = _verdicts(_data())
    assert v["b"] == REPRODUCED                              # 20 ± 1 vs 50 ± 1
    assert v["c"] == WITHIN_NOISE                            # 20 vs 20.5, std 1
    assert v["a"] == WITHIN_NOISE                            # 20 vs 1.1 x 19 = 20.9: d 0.9 < 2 SE 1.33
    assert _verdicts(_data(teacher16=25.0))["a"] == REPRODUCED   # 20 vs 27.5
    assert v["d"] == REPRODUCED and v["f"] == REPRODUCED
    assert v["e"] == NOT_REPRODUCED                          # GenEval-world 0.30 < the teacher's 0.318
    worse = _verdicts(_data(gan=(60.0, 61.0, 59.0), teacher16=10.0))
    assert worse["b"] == NOT_REPRODUCED and worse["a"] == NOT_REPRODUCED and worse["c"] == NOT_REPRODUCED
    one_seed = _data()
    one_seed.arms["c2i"]["soft_gan"]["eval/world_fid"] = [20.0]
    assert _verdicts(one_seed)["b"] == TOO_FEW               # never a verdict without seeds


def test_a_teacher_reference_uses_its_evaluation_se_and_the_factor():
    data = _data()
    check = evaluate_claim(CLAIMS[0], data)[1]              # soft_gan vs 1.1 x teacher 16
    assert math.isclose(check.reference.mean, 20.9) and math.isclose(check.d, 0.9)
    assert math.isclose(check.se, math.sqrt(1 / 3 + 0.33 ** 2))


@pytest.mark.parametrize("missing", ["c2i", "t2i"])
def test_render_writes_every_claim_with_its_paper_reference_command_and_commit(tmp_path, missing):
    data = _data()
    data.arms.pop(missing)                                  # a track not run yet: its claims say so
    files, page, verdicts = render(data, tmp_path, "python -m orchestrator.claims x=1", "abc123",
                                   {"c2i": "sweep `claims_c2i`", "t2i": "sweep `claims_t2i`"})
    assert (tmp_path / "claims.md").read_text() == page
    for claim in CLAIMS:
        assert f"## Claim {claim.key}: {claim.text}" in page and claim.paper in page
        assert (tmp_path / f"claim_{claim.key}.png").stat().st_size > 1000
    assert "`python -m orchestrator.claims x=1`" in page and "`abc123`" in page and RULE in page
    assert all(verdicts[c.key] == TOO_FEW for c in CLAIMS if c.track == missing)
    assert "seeds 0, 1, 2" in page and "at each evaluated training step" not in page   # one step each
    if missing == "t2i":
        assert "[0, 0.95] (10) < [0, 0.5] (20) < [0, 0] (30)" in page      # claim d's order
        assert "| **reproduced** |" in page and "(n=3)" in page
    assert len(files) == len(CLAIMS) + 1


def test_the_report_reads_arms_seeds_and_cached_teacher_references_from_sweep_folders(tmp_path):
    """claims_report.gather on a sweep folder as a finished claims sweep leaves it (no Ray, no MLflow)."""
    import json

    from orchestrator import report
    from orchestrator.claims_report import REFS_VERSION, TEACHER_STEPS, gather
    from orchestrator.config import UserError
    from orchestrator.sweeping.layout import SweepLayout

    layout = SweepLayout(tmp_path / "claims_c2i")
    config = {"teacher": {"kind": "world_c2i"}, "world": {"spec": "test"}}
    trials = [{"key": f"t00{i}", "overrides": {"arm": arm, "seed": seed}, "config": {**config, "seed": seed}}
              for i, (arm, seed) in enumerate([("soft_gan", 0), ("soft_gan", 1), ("dimo_only", 0)])]
    students = [{"key": "student-seed0", "overrides": {"seed": 0}, "config": {**config, "seed": 0}}]
    evaluation = {"metrics": ["world_fid"]}
    layout.root.mkdir(parents=True)
    layout.state.write_text(json.dumps({"name": "claims_c2i", "file": {"evaluation": evaluation},
                                        "trials": trials, "students": students, "commits": ["abc", "def"]}))
    for i, t in enumerate(students + trials):
        layout.trial(t["key"]).root.mkdir(parents=True)
        layout.trial(t["key"]).eval_log.write_text("".join(
            json.dumps({"step": s, "checkpoint": "x", "metrics": {"eval/world_fid": 10.0 * i + s}}) + "\n"
            for s in (4, 1, 2, 3)))                 # the second half's mean: steps 2, 3, 4 -> 10 i + 3
    key = {"evaluation": evaluation, "teacher": config["teacher"], "world": config["world"],
           "steps": list(TEACHER_STEPS), "version": REFS_VERSION}
    layout.teacher_refs.write_text(json.dumps({"key": key, "steps": {"1": {"eval/world_fid": 300.0},
                                                                      "16": {"eval/world_fid": 9.0}}}))
    data, sources, parents = gather([layout.root])
    assert data.arms["c2i"] == {"student": {"eval/world_fid": [3.0]}, "soft_gan": {"eval/world_fid": [13.0, 23.0]},
                                "dimo_only": {"eval/world_fid": [33.0]}}
    assert "the mean of its 3 evaluation(s) over the second half" in sources["c2i"]
    assert data.curves["c2i"]["soft_gan"]["eval/world_fid"] == {s: [10.0 + s, 20.0 + s] for s in (1, 2, 3, 4)}
    assert data.seeds["c2i"] == [0, 1] and data.teacher["c2i"][16]["eval/world_fid"] == 9.0
    assert "claims_c2i" in sources["c2i"] and parents == [(None, "claims_c2i")]
    assert "run on `abc`, resumed on `def`" in sources["c2i"]

    # more seeds in a second folder of the same track: seeds and values add up, both are sources
    more = SweepLayout(tmp_path / "claims_c2i_more")
    shutil.copytree(layout.root, more.root)
    state = json.loads(more.state.read_text())
    for t in state["trials"] + state["students"]:
        t["config"]["seed"] += 2
    state["commits"] = ["unrecorded", "ghi"]
    more.state.write_text(json.dumps({**state, "name": "claims_c2i_more"}))
    data, sources, _ = gather([layout.root, more.root])
    assert data.seeds["c2i"] == [0, 1, 2, 3]
    assert data.arms["c2i"]["soft_gan"]["eval/world_fid"] == [13.0, 23.0, 13.0, 23.0]
    assert "`claims_c2i`" in sources["c2i"] and "`claims_c2i_more`" in sources["c2i"]
    assert "run on an unrecorded commit, resumed on `ghi`" in sources["c2i"]
    with pytest.raises(UserError, match="seed 0 of the c2i claims is also in an earlier folder"):
        gather([layout.root, more.root, layout.root])
    out = tmp_path / "page"
    assert report.main(["--claims", str(layout.root), "--out", str(out)]) == 0
    page = (out / "claims.md").read_text()
    assert "| b | " in page
    # claim b's trajectories: soft_gan's mean over seeds 0 and 1 at steps 1..4, dimo_only's one seed
    assert "| arm | step 1 | step 2 | step 3 | step 4 |" in page
    assert "(`soft_gan`) | 16 | 17 | 18 | 19 |" in page and "(`dimo_only`) | 31 | 32 | 33 | 34 |" in page
    with pytest.raises(UserError, match="not a sweep folder"):
        gather([tmp_path / "nothing"])
