"""IS, precision/recall, density/coverage against closed forms and the prdc package; streaming metrics."""

import numpy as np
import pytest
import torch

from evaluators.metrics.fid import feature_statistics, frechet_distance
from evaluators.metrics.image_metrics import ImageMetrics, inception_score, load_reference_images, prdc


pytestmark = pytest.mark.usefixtures("no_network")




def confident_logits(n: int, classes: int) -> np.ndarray:
    """n images, each certain of one class, classes used equally: IS = classes."""
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % classes] = 60.0
    return logits


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((10, 1008))) == (pytest.approx(1.0), pytest.approx(0.0))


def test_inception_score_splits_5000_images_in_file_order():
    # splits of 5000, 5000, 2000 images certain of 10, 20 and 4 balanced classes
    logits = np.concatenate([confident_logits(5000, 10), confident_logits(5000, 20), confident_logits(2000, 4)])
    mean, std = inception_score(logits)
    assert mean == pytest.approx(np.mean([10, 20, 4]), rel=1e-6)
    assert std == pytest.approx(np.std([10, 20, 4]), rel=1e-6)
    assert inception_score(logits[:4000]) == (pytest.approx(10, rel=1e-6), 0.0)   # < 5000: one split


def test_inception_score_equals_the_adm_formula():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(300, 1008))
    mean, _ = inception_score(logits, split_size=100)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1)))
                for part in np.split(p, 3)]
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_equals_the_prdc_package_on_continuous_data(k):
    reference = pytest.importorskip("prdc")
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(200, 10)), rng.normal(0.3, 1.2, size=(150, 10))
    expected = reference.compute_prdc(real, fake, nearest_k=k)
    for dtype in (torch.float64, torch.float32):
        got = prdc(real, fake, k=k, chunk=17, dtype=dtype)
        assert got == pytest.approx({key: float(v) for key, v in expected.items()}, abs=1e-12)


def test_prdc_of_identical_sets_and_of_far_clusters():
    x = np.random.default_rng(1).normal(size=(100, 8))
    same = prdc(x, x, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    assert prdc(x, x + 100.0, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_uses_separate_k_for_density_and_coverage():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(120, 6)), rng.normal(0.5, 1.0, size=(90, 6))
    both = prdc(real, fake, k=3, k_dc=5)
    pr, dc = prdc(real, fake, k=3), prdc(real, fake, k=5)
    assert both == {"precision": pr["precision"], "recall": pr["recall"],
                    "density": dc["density"], "coverage": dc["coverage"]}


def test_prdc_never_builds_more_than_chunk_rows_of_distances(monkeypatch):
    shapes = []
    cdist = torch.cdist

    def recording(a, b, *args, **kwargs):
        shapes.append((a.shape[0], b.shape[0]))
        return cdist(a, b, *args, **kwargs)
    monkeypatch.setattr(torch, "cdist", recording)
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(250, 4)), rng.normal(size=(180, 4))
    chunked = prdc(real, fake, k=3, chunk=32)
    assert max(rows for rows, _ in shapes) <= 32 and len(shapes) == 8 + 6 + 6
    monkeypatch.setattr(torch, "cdist", cdist)
    assert chunked == prdc(real, fake, k=3, chunk=1000)


def test_prdc_rejects_too_few_points_and_mismatched_dims():
    with pytest.raises(ValueError, match="more than k"):
        prdc(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="dims"):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)), k=3)


def test_image_metrics_streaming_equals_whole_set_computation():
    rng = np.random.default_rng(4)
    pool3, logits = rng.gamma(2.0, size=(60, 16)), rng.normal(size=(60, 1008))
    ref = rng.gamma(2.2, size=(50, 16))
    ref_mu, ref_sigma = feature_statistics(ref)
    metrics = ImageMetrics()
    for start in range(0, 60, 25):
        metrics.update({"pool3": torch.from_numpy(pool3[start:start + 25]).float(),
                        "logits_unbiased": torch.from_numpy(logits[start:start + 25]).float()})
    pool3, logits = pool3.astype(np.float32), logits.astype(np.float32)   # what the network hands over
    out = metrics.compute(ref_mu, ref_sigma, ref_pool3=ref)
    assert metrics.n == 60 and out["num_images"] == 60
    assert out["fid"] == pytest.approx(frechet_distance(*feature_statistics(pool3), ref_mu, ref_sigma), rel=1e-9)
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(logits))
    pr, dc = prdc(ref, pool3, k=3), prdc(ref, pool3, k=5)
    assert (out["precision"], out["recall"]) == (pr["precision"], pr["recall"])
    assert (out["density"], out["coverage"]) == (dc["density"], dc["coverage"])
    assert "precision" not in metrics.compute(ref_mu, ref_sigma)


def test_load_reference_images_turns_nhwc_into_nchw(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, size=(4, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(2), sigma=np.eye(2))
    loaded = load_reference_images(tmp_path / "ref.npz")
    assert loaded.dtype == torch.uint8 and loaded.shape == (4, 3, 8, 6)
    assert torch.equal(loaded[1, 2], torch.from_numpy(images[1, :, :, 2]))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="arr_0"):
        load_reference_images(tmp_path / "stats.npz")
