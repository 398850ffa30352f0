"""Sweep files: schema, validation messages, trial expansion and the shipped sweeps (no Ray)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import UserError
from orchestrator.sweeping.dry_run import format_dry_run
from orchestrator.sweeping.spec import SweepFile, SweepSpec, Trial, load_sweep

ROOT = Path(__file__).resolve().parents[2]
C2I = ROOT / "sweeps" / "presets" / "tiny_c2i.yaml"
T2I = ROOT / "sweeps" / "presets" / "tiny_t2i.yaml"


def write(tmp_path: Path, body: str, preset: Path = C2I, name: str = "s.yaml") -> Path:
    """A sweep file named "s" on ``preset`` plus ``body`` (YAML)."""
    path = tmp_path / name
    path.write_text(f"name: s\npreset: {preset}\n{body}")
    return path


def load(tmp_path: Path, body: str, overrides=(), preset: Path = C2I) -> SweepSpec:
    return load_sweep(write(tmp_path, body, preset), overrides, cwd=tmp_path)


def column(spec: SweepSpec, key: str) -> list:
    return [t.overrides[key] for t in spec.trials]


# --- expansion -----------------------------------------------------------------------------------

def test_grid_product_in_key_order_last_key_fastest(tmp_path):
    spec = load(tmp_path, "search:\n  gan.weight: {grid: [0, 25]}\n  seed: {grid: [0, 1, 2]}\n")
    assert [t.key for t in spec.trials] == ["t000", "t001", "t002", "t003", "t004", "t005"]
    assert [(t.overrides["gan.weight"], t.overrides["seed"]) for t in spec.trials] == [
        (0.0, 0), (0.0, 1), (0.0, 2), (25.0, 0), (25.0, 1), (25.0, 2)]
    assert [(t.config["gan"]["weight"], t.config["seed"]) for t in spec.trials] == [
        (0.0, 0), (0.0, 1), (0.0, 2), (25.0, 0), (25.0, 1), (25.0, 2)]
    assert spec.trials[4].label == "gan.weight=25.0 seed=1"
    assert isinstance(spec.trials[0].overrides["gan.weight"], float)  # the config's type, not YAML's


def test_num_samples_repeats_the_whole_grid(tmp_path):
    spec = load(tmp_path, "num_samples: 3\nsearch:\n  gan.mask_range: {grid: [[0.0, 0.0], [0.0, 0.95]]}\n")
    assert column(spec, "gan.mask_range") == [[0.0, 0.0], [0.0, 0.95]] * 3
    assert spec.trials[1].label == "gan.mask_range=[0.0, 0.95]"


def test_no_search_gives_base_trials(tmp_path):
    spec = load(tmp_path, "num_samples: 2\nbase: {train.steps: 7}\n")
    assert [(t.key, t.label, t.overrides) for t in spec.trials] == [("t000", "base", {}),
                                                                   ("t001", "base", {})]
    assert all(t.config["train"]["steps"] == 7 for t in spec.trials)


def test_random_draws_follow_the_seeded_generator_in_trial_order(tmp_path):
    body = ("num_samples: 4\nsearch_seed: 3\nsearch:\n"
            "  embedding.temperature: {uniform: [0.5, 2.0]}\n"
            "  train.lr_generator: {loguniform: [1.0e-5, 1.0e-3]}\n"
            "  embedding.kind: {choice: [soft, gumbel_st]}\n")
    spec = load(tmp_path, body)
    rng = np.random.default_rng(3)
    for trial in spec.trials:  # per trial, in search order
        assert trial.overrides["embedding.temperature"] == pytest.approx(rng.uniform(0.5, 2.0))
        assert trial.overrides["train.lr_generator"] == pytest.approx(
            math.exp(rng.uniform(math.log(1e-5), math.log(1e-3))))
        assert trial.overrides["embedding.kind"] == ["soft", "gumbel_st"][rng.integers(2)]
        assert trial.config["embedding"]["temperature"] == trial.overrides["embedding.temperature"]
    assert all(0.5 <= v <= 2.0 for v in column(spec, "embedding.temperature"))
    assert all(1e-5 <= v <= 1e-3 for v in column(spec, "train.lr_generator"))
    assert len(set(column(spec, "embedding.temperature"))) == 4
    again = load(tmp_path, body)
    assert [t.overrides for t in again.trials] == [t.overrides for t in spec.trials]
    other = load(tmp_path, body.replace("search_seed: 3", "search_seed: 4"))
    assert column(other, "embedding.temperature") != column(spec, "embedding.temperature")


def test_random_axes_draw_per_trial_of_the_grid(tmp_path):
    spec = load(tmp_path, "num_samples: 2\nsearch:\n  seed: {grid: [0, 1]}\n"
                          "  embedding.temperature: {loguniform: [0.1, 10]}\n")
    assert column(spec, "seed") == [0, 1, 0, 1]
    assert len(set(column(spec, "embedding.temperature"))) == 4


def test_list_index_keys_in_search_and_base(tmp_path):
    spec = load(tmp_path, "base: {reward.terms.0.weight: 0.5}\n"
                          "search:\n  reward.terms.1.weight: {grid: [0.0, 1.0]}\n", preset=T2I)
    assert [t.config["reward"]["terms"] for t in spec.trials] == [
        [{"name": "quality", "weight": 0.5}, {"name": "clip", "weight": 0.0}],
        [{"name": "quality", "weight": 0.5}, {"name": "clip", "weight": 1.0}]]
    whole = load(tmp_path, "search:\n  reward.terms: {grid: [[{name: clip, weight: 2}]]}\n", preset=T2I)
    assert whole.trials[0].overrides == {"reward.terms": [{"name": "clip", "weight": 2.0}]}


def test_training_overrides_apply_to_every_trial_after_base(tmp_path):
    spec = load(tmp_path, "base: {train.steps: 500, gan.start_step: 4}\n"
                          "search:\n  gan.weight: {grid: [0, 25]}\n",
                overrides=["train.steps=7", "gan.mask_range=[0.0,0.95]"])
    assert all(t.config["train"]["steps"] == 7 for t in spec.trials)
    assert all(t.config["gan"]["mask_range"] == [0.0, 0.95] for t in spec.trials)
    assert all(t.config["gan"]["start_step"] == 4 for t in spec.trials)
    assert column(spec, "gan.weight") == [0.0, 25.0]


def test_sweep_overrides_edit_the_sweep_file(tmp_path):
    spec = load(tmp_path, "search:\n  gan.weight: {grid: [0, 25]}\n  seed: {grid: [0, 1]}\n",
                overrides=["sweep.scaling.num_workers=2", "sweep.max_concurrent_trials=1",
                           f"sweep.output_dir={tmp_path / 'x'}", "sweep.base.train.steps=9",
                           "sweep.search.seed=null", "sweep.search.embedding.temperature={grid: [1, 2]}"])
    assert spec.file.scaling.num_workers == 2 and spec.file.max_concurrent_trials == 1
    assert spec.sweep_dir == tmp_path / "x" / "s"
    assert list(spec.file.search) == ["gan.weight", "embedding.temperature"]
    assert [t.label for t in spec.trials] == [
        "gan.weight=0.0 embedding.temperature=1.0", "gan.weight=0.0 embedding.temperature=2.0",
        "gan.weight=25.0 embedding.temperature=1.0", "gan.weight=25.0 embedding.temperature=2.0"]
    assert all(t.config["train"]["steps"] == 9 for t in spec.trials)


def test_paths_and_device(tmp_path):
    (tmp_path / "presets").mkdir()
    shutil.copy(C2I, tmp_path / "presets" / "p.yaml")
    path = tmp_path / "s.yaml"
    path.write_text("name: s\npreset: presets/p.yaml\noutput_dir: out\nbase: {world.cache_dir: cache}\n"
                    "scaling: {use_gpu: true}\n")
    spec = load_sweep("s.yaml", cwd=tmp_path)  # the sweep file, too, is found from cwd
    assert spec.source == "s.yaml"
    assert spec.preset == str(tmp_path / "presets" / "p.yaml")
    assert spec.file.output_dir == str(tmp_path / "out")
    config = spec.trials[0].config
    assert config["output_dir"] == str(tmp_path / "out" / "s" / "trials" / "t000")
    assert config["world"]["cache_dir"] == str(tmp_path / "cache")
    assert config["train"]["device"] == "cuda"
    cpu = load(tmp_path, "")
    assert cpu.trials[0].config["train"]["device"] == "cpu"
    assert cpu.trials[0].config["world"]["cache_dir"] is None


def test_types_and_json(tmp_path):
    spec = load(tmp_path, "search:\n  gan.weight: {grid: [0, 25]}\n")
    assert isinstance(spec.file, SweepFile) and all(isinstance(t, Trial) for t in spec.trials)
    data = json.loads(json.dumps(spec.to_json()))
    assert data["name"] == "s" and data["sweep_dir"] == str(spec.sweep_dir)
    assert data["file"]["scheduler"] == {"type": "fifo", "grace_period": None, "max_t": None,
                                         "reduction_factor": 2.0}
    assert [t["key"] for t in data["trials"]] == ["t000", "t001"]
    assert data["trials"][1]["config"]["gan"]["weight"] == 25.0


def test_format_dry_run_lists_every_trial(tmp_path):
    spec = load(tmp_path, "scaling: {num_workers: 2}\n"
                          "search:\n  gan.mask_range: {grid: [[0.0, 0.0], [0.0, 0.95]]}\n")
    text = format_dry_run(spec)
    assert "sweep s" in text and str(C2I) in text and "trials:      2" in text
    assert "global batch: 64" in text and "fifo" in text
    assert "t000  gan.mask_range=[0.0, 0.0]" in text and "t001  gan.mask_range=[0.0, 0.95]" in text
    assert "mask_range: [0.0, 0.95]" in text and str(spec.sweep_dir / "trials" / "t001") in text


# --- the shipped sweeps --------------------------------------------------------------------------

SHIPPED = [
    ("gan_mask", "tiny_c2i", "gan.mask_range", [[0.0, 0.0], [0.0, 0.5], [0.0, 0.95]]),
    ("gan_weight", "tiny_c2i", "gan.weight", [0.0, 25.0, 100.0, 200.0]),
    ("clip_weight", "tiny_t2i", "reward.terms.1.weight", [0.0, 0.1, 0.2, 0.5, 1.0]),
    ("temperature", "tiny_c2i", "embedding.temperature", [0.5, 1.0, 2.0, 4.0]),
    ("embedding", "tiny_c2i", "embedding.kind", ["soft", "gumbel_st"]),
]


@pytest.mark.parametrize("name, preset, key, values", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_sweeps(tmp_path, name, preset, key, values):
    spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml", cwd=tmp_path)
    assert spec.file.name == name and Path(spec.preset).name == f"{preset}.yaml"
    assert column(spec, key) == values
    steps = 400 if name == "gan_mask" else 500     # the README's main command fits 20 min on 2 cores
    assert all(t.config["train"]["steps"] == steps for t in spec.trials)
    assert (spec.file.metric, spec.file.mode, spec.file.evaluation.num_images) == (
        "eval/world_fid", "min", 500)
    assert spec.sweep_dir == tmp_path / "runs" / "sweeps" / name
    assert (ROOT / "sweeps" / f"{name}.yaml").read_text().startswith("# ")  # says what it reproduces


def test_clip_weight_keeps_quality_at_one_and_reports_test_time_scaling(tmp_path):
    spec = load_sweep(ROOT / "sweeps" / "clip_weight.yaml", cwd=tmp_path)
    for trial in spec.trials:
        assert trial.config["reward"]["terms"][0] == {"name": "quality", "weight": 1.0}
        assert trial.config["reward"]["terms"][1]["name"] == "clip"
    from orchestrator.sweeping.schema import eval_settings

    settings = eval_settings(spec.file.evaluation)
    assert settings.test_time["bon"] == 4 and settings.test_time["iters"] == 4
    assert "again with Best-of-4 + 4 TTEO iterations" in format_dry_run(spec)


# --- validation: one line naming the file and the key --------------------------------------------

ERRORS = [  # (sweep file body after name/preset, overrides, what the message must contain)
    ("nmae: x\n", [], "nmae"),
    ("scheduler: {type: asha, grace: 3}\n", [], "scheduler.grace"),
    ("num_samples: abc\n", [], "num_samples"),
    ("search:\n  gan.wieght: {grid: [1]}\n", [], "search.gan.wieght: not a key of the training config"),
    ("search:\n  reward.terms.5.weight: {grid: [1]}\n", [], "search.reward.terms.5.weight: index 5"),
    ("search:\n  reward.terms.x: {grid: [1]}\n", [], "search.reward.terms.x"),
    ("search:\n  output_dir: {grid: [a]}\n", [], "search.output_dir: set per trial"),
    ("search:\n  gan.weight: {grid: [1], choice: [2]}\n", [], "search.gan.weight: needs exactly one"),
    ("search:\n  gan.weight: {range: [1, 2]}\n", [], "search.gan.weight: needs exactly one"),
    ("search:\n  gan.weight: [1, 2]\n", [], "search.gan.weight: needs exactly one"),
    ("search:\n  gan.weight: {grid: []}\n", [], "search.gan.weight: grid needs a non-empty list"),
    ("search:\n  gan.weight: {choice: []}\n", [], "search.gan.weight: choice needs a non-empty list"),
    ("search:\n  gan.weight: {uniform: [1]}\n", [], "search.gan.weight: uniform needs [low, high]"),
    ("search:\n  gan.weight: {uniform: [2, 1]}\n", [], "search.gan.weight: uniform needs low < high"),
    ("search:\n  gan.weight: {loguniform: [0, 1]}\n", [], "search.gan.weight: loguniform needs low > 0"),
    ("search:\n  gan.weight: {grid: [abc]}\n", [], "search.gan.weight: value abc"),
    ("search:\n  gan.weight: {grid: [1, -1]}\n", [], "search.gan.weight: value -1: must be >= 0"),
    ("search:\n  embedding.kind: {choice: [soft, hard]}\nnum_samples: 9\n", [],
     "search.embedding.kind: value hard"),
    ("search:\n  embedding.temperature: {uniform: [-1, 1]}\n", [],
     "search.embedding.temperature: value -1: must be > 0"),
    ("search:\n  gan.mask_range: {grid: [[0.9, 0.1]]}\n", [], "search.gan.mask_range: value [0.9, 0.1]"),
    ("search:\n  reward.weight: {grid: [0.5]}\n", [], "trial t000 (reward.weight=0.5): reward.terms"),
    ("base: {train.stepz: 3}\n", [], "base.train.stepz: not a key of the training config"),
    ("base: {train.steps: 0}\n", [], "base.train.steps: must be > 0"),
    ("base: {train.steps: abc}\n", [], "base.train.steps"),
    ("base: {train: {stepz: 3}}\n", [], "base.train"),
    ("", ["train.steps=0"], "(override train.steps=0): train.steps: must be > 0"),
    ("", ["train.stepz=0"], "(override train.stepz=0): train.stepz: not a key"),
    ("", ["train.device=cuda"], "(override train.device=cuda): train.device: set from scaling.use_gpu"),
    ("", ["train.steps"], "override 'train.steps' is not of the form key=value"),
    ("", ["sweep.scaling.workers=2"], "(override sweep.scaling.workers=2): scaling.workers"),
    ("search:\n  gan.weight: {grid: [1]}\n", ["gan.weight=3"],
     "search.gan.weight: also set by the override gan.weight=3; remove one"),
    ("scheduler: {type: hyperband}\n", [], "scheduler.type: 'hyperband' is not one of fifo, asha"),
    ("scheduler: {type: asha, max_t: 100}\nevaluation: {every_images: 10}\n", [],
     "scheduler.grace_period: asha needs grace_period"),
    ("scheduler: {type: asha, grace_period: 10}\nevaluation: {every_images: 10}\n", [],
     "scheduler.max_t: asha needs max_t"),
    ("scheduler: {type: asha, grace_period: 10, max_t: 5}\nevaluation: {every_images: 10}\n", [],
     "scheduler.max_t: must be >= grace_period"),
    ("scheduler: {type: asha, grace_period: 1, max_t: 5, reduction_factor: 1}\n"
     "evaluation: {every_images: 10}\n", [], "scheduler.reduction_factor: must be > 1"),
    ("scheduler: {type: asha, grace_period: 1, max_t: 5}\n", [],
     "scheduler.type: asha needs a metric the trials report"),
    ("num_samples: 0\n", [], "num_samples: must be >= 1"),
    ("max_concurrent_trials: 0\n", [], "max_concurrent_trials: must be >= 1"),
    ("scaling: {num_workers: 0}\n", [], "scaling.num_workers: must be >= 1"),
    ("scaling: {cpus_per_worker: 0}\n", [], "scaling.cpus_per_worker: must be > 0"),
    ("output_dir: gs://bucket/x\n", [], "output_dir: 'gs://bucket/x': a folder or s3://bucket/prefix"),
    ("output_dir: s3://\n", [], "output_dir: 's3://' names no bucket"),
    ("output_dir: s3://bucket/x\nstorage: {aws_secret_access_key: k}\n", [], "storage.aws_secret_access_key"),
    ("output_dir: s3://bucket/x\nstorage: {endpoint_url: 'http://127.0.0.1:9000'}\n", [], None),
    ("scaling: {use_gpu: true, gpus_per_worker: 1.5}\n", [], "scaling.gpus_per_worker: Ray takes a fraction"),
    ("scaling: {use_gpu: true, gpus_per_worker: 0.25}\n", [], None),
    ("evaluation: {gpus_per_actor: 2.5}\n", [], "evaluation.gpus_per_actor: Ray takes a fraction"),
    ("failure: {max_failures: -1}\n", [], "failure.max_failures: must be >= 0"),
    ("mode: minimum\n", [], "mode: 'minimum' is not one of min, max"),
    ("evaluation: {metrics: [world_fid, fidd]}\n", [], "evaluation.metrics"),
    ("evaluation: {temperatures: [1.0, 0]}\n", [], "evaluation.temperatures: needs positive"),
    ("evaluation: {actors: 0}\n", [], "evaluation.actors: must be >= 1"),
    ("evaluation: {late_checkpoints: 0}\n", [], "evaluation.late_checkpoints: must be >= 1"),
    ("evaluation: {metrics: [prdc]}\nmetric: eval/precision\nmode: max\n", [], None),
    ("evaluation: {num_images: -1}\n", [], "evaluation.num_images: must be >= 0"),
    ("evaluation: {num_images: 0}\n", [], "metric: eval/world_fid is never computed"),
    ("evaluation: {test_time: {bon: 0}}\n", [], "evaluation.test_time.bon: must be >= 1"),
    ("evaluation: {test_time: {lr: -0.2}}\n", [], "evaluation.test_time.lr: must be > 0"),
    ("evaluation: {test_time: {rewards: {aesthetic: 1}}}\n", [],
     "evaluation.test_time.rewards: unknown reward 'aesthetic'"),
    ("evaluation: {test_time: {itres: 4}}\n", [], "evaluation.test_time.itres"),
    ("evaluation: {geneval_prompts_per_task: 0}\n", [], "evaluation.geneval_prompts_per_task: must be >= 1"),
    ("evaluation: {metrics: [geneval_world]}\nmetric: eval/tts/geneval_world\nmode: max\n", [],
     "metric: eval/tts/geneval_world is never computed"),
    ("evaluation: {metrics: [geneval_world], test_time: {bon: 4, iters: 4}}\n"
     "metric: eval/tts/geneval_world\nmode: max\n", [], None),
    ("evaluation: {metrics: [world_fid], test_time: {bon: 4}}\nmetric: eval/tts/world_fid\n", [],
     "metric: eval/tts/world_fid is never computed"),
    ("search_seed: -1\n", [], "search_seed: must be >= 0, got -1"),
    ("scheduler: fifo\n", [], "s.yaml: scheduler: "),          # a string where a section goes
    ("num_samples: 1000000\nsearch: {seed: {grid: [0, 1]}}\n", [], "num_samples: 2000000 trials"),
    # 10,000 trials, the limit, is accepted: expanding them takes minutes, so only the full suite runs it
    pytest.param("num_samples: 5000\nsearch: {seed: {grid: [0, 1]}}\n", [], None, marks=pytest.mark.slow),
    ("", ["reward.terms.3.weight=0.5"], "index 3 out of range"),
]


@pytest.mark.parametrize("body, overrides, needle", ERRORS,
                         ids=[((e.values if hasattr(e, "values") else e)[2] or "valid")[:40] for e in ERRORS])
def test_validation_errors_name_file_and_key(tmp_path, body, overrides, needle):
    path = write(tmp_path, body)
    if needle is None:                       # a valid file: no error
        load_sweep(path, overrides, cwd=tmp_path)
        return
    with pytest.raises(UserError) as err:
        load_sweep(path, overrides, cwd=tmp_path)
    message = str(err.value)
    assert message.startswith(str(path)) and needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text, needle", [
    ("preset: x.yaml\n", "s.yaml: name: missing"),
    ("name: s\n", "s.yaml: preset: missing"),
    ("name: a/b\npreset: x.yaml\n", "s.yaml: name: 'a/b' may only use"),
    ("name: ..\npreset: x.yaml\n", "s.yaml: name: '..' may only use"),      # never <output_dir>/..
    ("name: .s\npreset: x.yaml\n", "cannot start with ."),
    ("name: s\npreset: nope/p.yaml\n", "s.yaml: preset: {tmp}/nope/p.yaml not found"),
])
def test_name_and_preset_errors(tmp_path, text, needle):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(UserError) as err:
        load_sweep(tmp_path / "s.yaml", cwd=tmp_path)
    assert needle.format(tmp=tmp_path) in str(err.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: file not found"):
        load_sweep(tmp_path / "nope.yaml")


def test_plan_resources_shares_the_cores_out_and_leaves_room_for_the_evaluator_pool(tmp_path):
    from orchestrator.sweep import plan_resources

    spec = load_sweep(ROOT / "sweeps" / "gan_mask.yaml", cwd=tmp_path)     # 3 trials, a pool
    assert spec.file.scaling.cpus_per_worker is None
    # a 2-core laptop: all three one-thread trials at once (two waves would leave a core idle in
    # the second), the pool's 0.5 taken from their share
    assert plan_resources(spec, {"CPU": 2.0}) == (3, 0.48, 1)
    assert plan_resources(spec, {"CPU": 8.0}) == (3, 2.48, 2)      # fewer trials than cores
    spec.file.max_concurrent_trials = 1
    assert plan_resources(spec, {"CPU": 2.0}) == (1, 1.49, 2)      # one at a time: both cores
    spec.file.max_concurrent_trials = None
    spec.file.scaling.cpus_per_worker = 1.0                         # explicit: as given
    assert plan_resources(spec, {"CPU": 2.0}) == (1, 1.0, 1)       # 2 - 0.5 (pool) fits one
    assert plan_resources(spec, {"CPU": 8.0}) == (7, 1.0, 1)
    spec.file.evaluation.metrics = []                               # no pool
    assert plan_resources(spec, {"CPU": 2.0})[0] == 1               # the drivers' 0.01 CPU count too
    assert plan_resources(spec, {"CPU": 3.0})[0] == 2
    spec.file.max_concurrent_trials = 5
    assert plan_resources(spec, {"CPU": 3.0})[0] == 2               # capped: a third would hang
    gpu = load_sweep(ROOT / "sweeps" / "gan_mask.yaml", ["sweep.scaling.use_gpu=true",
                     "sweep.scaling.num_workers=2", "sweep.evaluation.gpus_per_actor=1"], cwd=tmp_path)
    assert plan_resources(gpu, {"CPU": 64.0, "GPU": 8.0})[0] == 3
    with pytest.raises(UserError, match="scaling: one trial needs"):
        plan_resources(gpu, {"CPU": 64.0, "GPU": 2.0})


def test_concurrency_avoids_a_last_wave_that_idles_cores():
    from orchestrator.sweeping.resources import _concurrency

    assert _concurrency(1, 2) == 1 and _concurrency(2, 2) == 2
    assert _concurrency(3, 2) == 3          # 1.5 trial-times instead of 2
    assert _concurrency(4, 2) == 2          # two waves of two: no idle core, less memory
    assert _concurrency(5, 2) == 2          # 3 waves of 2 beat 2 waves of 3 or 4
    assert _concurrency(6, 4) == 6          # 1.5 trial-times instead of 2
    assert _concurrency(10_000, 2) == 2
    assert _concurrency(3, 0) == 1          # no whole core: one at a time


def test_an_s3_output_dir_works_in_a_scratch_folder_named_after_the_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    spec = load(tmp_path, "output_dir: s3://bkt/some/prefix/\nstorage: {scratch_dir: scratch}\n")
    storage = spec.storage
    assert storage.uri == "s3://bkt/some/prefix" and storage.remote
    assert (storage.endpoint_url, storage.region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert spec.sweep_dir == tmp_path / "scratch/bkt/some/prefix/s"      # each node's working folder
    assert spec.trials[0].config["output_dir"] == str(spec.sweep_dir / "trials/t000")
    assert storage.location(spec.layout.trial("t000").result) == "s3://bkt/some/prefix/s/trials/t000/result.json"
    assert storage.ray_path(spec.layout.train) == "bkt/some/prefix/s/train"   # Ray's, with its filesystem
    assert "output:      s3://bkt/some/prefix/s (working folder" in format_dry_run(spec)
    local = load(tmp_path, "output_dir: out\n").storage                  # a folder: no storage layer
    assert not local.remote and local.local == tmp_path / "out" and local.filesystem() is None


def _gpu_sweep(tmp_path, *overrides):
    return load_sweep(ROOT / "sweeps" / "gan_mask.yaml", ["sweep.scaling.use_gpu=true", *overrides],
                      cwd=tmp_path)      # 3 trials, a one-actor evaluator pool


def test_plan_resources_puts_several_fractional_gpu_trials_on_one_gpu(tmp_path):
    from orchestrator.sweep import plan_resources

    quarter = _gpu_sweep(tmp_path, "sweep.scaling.gpus_per_worker=0.25",
                         "sweep.num_samples=2")                        # 6 trials
    # one GPU, the pool on CPU: four quarter-GPU trials at once (not 1.0 // 0.25 rounding down)
    assert plan_resources(quarter, {"CPU": 16.0, "GPU": 1.0}) == (4, 3.86, 4)
    assert plan_resources(quarter, {"CPU": 16.0, "GPU": 2.0})[0] == 6   # every trial
    # the pool on a quarter of the GPU: three trials beside it
    quarter.file.evaluation.gpus_per_actor = 0.25
    assert plan_resources(quarter, {"CPU": 16.0, "GPU": 1.0})[0] == 3
    # tenths: 1.0 // 0.1 is 9 in floats, Ray fits 10 (it counts in 1/10,000ths); 0.1 left for the pool
    tenth = _gpu_sweep(tmp_path, "sweep.scaling.gpus_per_worker=0.1", "sweep.num_samples=5",
                       "sweep.evaluation.gpus_per_actor=0.1")          # 15 trials
    assert plan_resources(tenth, {"CPU": 32.0, "GPU": 1.0})[0] == 9
    tenth.file.evaluation.gpus_per_actor = 0.0
    assert plan_resources(tenth, {"CPU": 32.0, "GPU": 1.0})[0] == 10
    # explicit CPUs: the GPU is what limits
    quarter.file.scaling.cpus_per_worker = 2.0
    quarter.file.evaluation.gpus_per_actor = 0.0
    assert plan_resources(quarter, {"CPU": 64.0, "GPU": 1.0}) == (4, 2.0, 2)
    # two workers per trial at half a GPU each: one trial per GPU
    halves = _gpu_sweep(tmp_path, "sweep.scaling.num_workers=2", "sweep.scaling.gpus_per_worker=0.5")
    assert plan_resources(halves, {"CPU": 16.0, "GPU": 2.0})[0] == 2


def test_plan_resources_refuses_a_cluster_without_the_gpus_asked_for(tmp_path):
    from orchestrator.sweep import plan_resources

    spec = _gpu_sweep(tmp_path, "sweep.scaling.gpus_per_worker=0.5")
    with pytest.raises(UserError, match=r"scaling: one trial needs .*'GPU': 0.5"):
        plan_resources(spec, {"CPU": 16.0})                             # a CPU-only cluster
    # a CPU sweep whose evaluator pool asks for a GPU the cluster lacks: its actor would wait forever
    cpu = load_sweep(ROOT / "sweeps" / "gan_mask.yaml", ["sweep.evaluation.gpus_per_actor=0.5"],
                     cwd=tmp_path)
    with pytest.raises(UserError, match=r"evaluator pool 1 x \(CPU 0.5, GPU 0.5\)"):
        plan_resources(cpu, {"CPU": 16.0})
    assert plan_resources(cpu, {"CPU": 16.0, "GPU": 1.0})[0] == 3


@pytest.mark.parametrize("workers, use_gpu, gpus, backend", [
    (1, False, 1.0, "gloo"), (2, False, 1.0, "gloo"),
    (1, True, 0.25, "nccl"),          # one rank: NCCL on its share of the GPU
    (2, True, 1.0, "nccl"), (4, True, 2.0, "nccl"),
    (2, True, 0.5, "gloo"),           # two ranks may share one GPU, which NCCL refuses
])
def test_multi_gpu_trials_use_nccl_and_shared_gpus_gloo(tmp_path, workers, use_gpu, gpus, backend):
    from orchestrator.sweeping.layout import TrialScaling

    assert TrialScaling(workers, use_gpu, 1.0, gpus, 1).backend == backend
    spec = load(tmp_path, f"scaling: {{num_workers: {workers}, use_gpu: {str(use_gpu).lower()}, "
                          f"gpus_per_worker: {gpus}}}\n")
    assert f"worker(s) on {'gpu' if use_gpu else 'cpu'} ({backend})" in format_dry_run(spec)


def test_results_table_shows_the_evaluation_noise_and_says_whether_trials_differ():
    from orchestrator.sweeping.stages import table as _table

    def row(key, fid, se):
        return {"key": key, "label": key, "status": "DONE",
                "metrics": {"step": 500, "eval/world_fid": fid, "eval/world_fid_se": se}}
    apart = _table([row("a", 40.0, 0.5), row("b", 48.0, 0.6)])
    assert "40 ± 0.5" in apart and "is larger than twice" in apart and "(a best, b worst)" in apart
    close = _table([row("a", 40.0, 2.0), row("b", 42.0, 2.5)])
    assert "is NOT larger than twice its evaluation noise (6.4" in close
    assert "Training-seed noise is not in it: add `seed:" in close
    seeded = _table([{**row("a", 40.0, 2.0), "label": "soft_gan seed=0"},
                     {**row("b", 42.0, 2.5), "label": "soft_gan seed=1"}])
    assert "add `seed:" not in seeded and "differ only in their seed" in seeded
    assert "noise" not in _table([{"key": "a", "label": "a", "status": "DONE",
                                   "metrics": {"eval/world_fid": 40.0}}])


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    path = write(tmp_path, "output_dir: out\n")
    with pytest.raises(UserError, match="output_dir: .*out is an existing file"):
        load_sweep(path, cwd=tmp_path)
