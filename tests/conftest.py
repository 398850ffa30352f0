"""Shared fixtures: the tiny "test" world, built once per session into a temporary cache."""
import os

import pytest
import torch

# Tests must never reach a model hub; the world is built from this project's code only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test world's networks are tiny: one thread is faster than two fighting over the cores, and
# subprocesses (CLI tests) inherit the setting.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def test_world(tmp_path_factory):
    """The loaded "test" world; $SOFTDIMO_CACHE points at its cache so subprocesses find it too."""
    from softdimo.world.store import load_world

    cache = tmp_path_factory.mktemp("softdimo-cache")
    os.environ["SOFTDIMO_CACHE"] = str(cache)
    return load_world("test", cache, build_if_missing=True, progress=False)


@pytest.fixture(scope="session")
def c2i_checkpoint(test_world, tmp_path_factory):
    """A 2-step class-to-image checkpoint on the test world (trained in this process)."""
    return _tiny_checkpoint("world_c2i", tmp_path_factory.mktemp("c2i_run"))


@pytest.fixture(scope="session")
def t2i_checkpoint(test_world, tmp_path_factory):
    return _tiny_checkpoint("world_t2i", tmp_path_factory.mktemp("t2i_run"))


def _tiny_checkpoint(kind: str, out):
    from pathlib import Path

    from orchestrator.config import load_config, to_dict
    from trainers.loop import train

    preset = Path(__file__).resolve().parents[1] / "sweeps/presets" / (
        "tiny_c2i.yaml" if kind == "world_c2i" else "tiny_t2i.yaml")
    cfg = load_config(preset, ["world.spec=test", "train.steps=2", "train.batch_size=8",
                               "train.grid_size=4", f"output_dir={out}", "train.device=cpu"])
    return train(cfg, to_dict(cfg), progress=False).checkpoint


_RAY_FIXTURES = {"ray_session", "ray_head"}


def pytest_collection_modifyitems(config, items):
    """Markers from where a test lives and what it uses, so no file can forget one.

    Everything under tests/e2e is `slow` (the fast tier is `-m "not slow"`); a test that asks for a
    Ray fixture is `ray`; a `gpu` test is skipped on a machine without CUDA.
    """
    cuda = torch.cuda.is_available()
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)
        if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
