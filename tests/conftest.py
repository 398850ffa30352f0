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
