"""FID maths against closed forms and clean-fid; streaming statistics; reference-statistics files."""
import hashlib
import warnings

import numpy as np
import pytest
import torch

import evaluators.metrics.fid as fid
from evaluators.metrics.fid import (RunningStats, feature_statistics, fid_from_features, frechet_distance,
                            load_reference_stats)


pytestmark = pytest.mark.usefixtures("no_network")




def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(fid_from_features(x, x)) < 1e-6
    shifted = fid_from_features(x, x + 0.5)
    assert shifted == pytest.approx(8 * 0.25, rel=1e-6)


def test_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(1).normal(size=(50, 3))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1))
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


@pytest.mark.parametrize("n", [400, 40])   # 40 < D: near-singular covariances
def test_frechet_distance_equals_clean_fid(n):
    cleanfid_fid = pytest.importorskip("cleanfid.fid")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(n, 64)), rng.gamma(2.0, size=(n, 64))
    s1, s2 = feature_statistics(a), feature_statistics(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # clean-fid passes scipy's deprecated disp=
        expected = cleanfid_fid.frechet_distance(*s1, *s2)
    assert frechet_distance(*s1, *s2) == pytest.approx(expected, rel=1e-6)


def test_fid_is_invariant_to_rotating_both_feature_sets():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.2, 1.5, size=(300, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert fid_from_features(a @ q, b @ q) == pytest.approx(fid_from_features(a, b), rel=1e-8)


def test_large_imaginary_part_raises():
    # sigma2 is not PSD, so sqrt(sigma1·sigma2) has an imaginary diagonal entry of 1
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_non_finite_sqrtm_falls_back_to_eps_on_the_diagonal(monkeypatch):
    calls = []
    real_sqrtm = fid.linalg.sqrtm

    def first_call_fails(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)
    monkeypatch.setattr(fid.linalg, "sqrtm", first_call_fails)
    with pytest.warns(RuntimeWarning, match="adding 0.01"):
        value = frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2), eps=0.01)
    np.testing.assert_allclose(calls[1], np.eye(2) * 1.01 ** 2)
    assert value == pytest.approx(2.0 + 4.0 - 2 * 2 * 1.01)


@pytest.mark.parametrize("splits", [[100], [1, 99], [7, 50, 43], [2] * 50])
def test_running_stats_equal_numpy_for_any_batch_split(splits):
    x = np.random.default_rng(4).normal(3.0, 2.0, size=(100, 12))
    stats = RunningStats()
    for i, part in enumerate(np.split(x, np.cumsum(splits)[:-1])):
        stats.update(torch.from_numpy(part) if i % 2 else part)   # numpy and torch batches mix
    mu, sigma = stats.statistics()
    assert stats.n == 100
    np.testing.assert_allclose(mu, x.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-10)
    assert np.array_equal(sigma, sigma.T)


def test_running_stats_merge_equals_one_accumulator():
    x = np.random.default_rng(5).normal(size=(60, 5))
    whole, left, right = RunningStats(), RunningStats(), RunningStats()
    whole.update(x)
    left.update(x[:25])
    right.update(x[25:])
    left.merge(right).merge(RunningStats())
    np.testing.assert_allclose(left.cov(), whole.cov(), atol=1e-12)
    np.testing.assert_allclose(left.mean(), whole.mean(), atol=1e-12)
    with pytest.raises(ValueError):
        left.update(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        RunningStats().cov()


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_reference_stats_reads_an_adm_batch_without_loading_its_images(tmp_path):
    x = np.random.default_rng(6).normal(size=(30, 8))
    mu, sigma = feature_statistics(x)
    images = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    path = _write_npz(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=mu.astype(np.float32),
                      sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])
    got_mu, got_sigma, meta = load_reference_stats(path)
    assert got_mu.dtype == got_sigma.dtype == np.float64
    np.testing.assert_allclose(got_mu, mu, rtol=1e-6)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["n_images"] == 5 and meta["images_shape"] == [5, 16, 16, 3] and meta["dim"] == 8
    assert meta["keys"] == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]


def test_load_reference_stats_accepts_any_npz_with_mu_and_sigma(tmp_path):
    path = _write_npz(tmp_path / "clean.npz", mu=np.zeros(3), sigma=np.eye(3))
    mu, sigma, meta = load_reference_stats(path)
    assert mu.shape == (3,) and sigma.shape == (3, 3) and "n_images" not in meta


@pytest.mark.parametrize("arrays, match", [
    (dict(mu=np.zeros(3)), "'mu' and 'sigma'"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), r"mu \[D\] and sigma"),
    (dict(mu=np.zeros((3, 1)), sigma=np.eye(3)), r"mu \[D\] and sigma"),
    (dict(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]])), "symmetric"),
    (dict(mu=np.array([0.0, np.nan]), sigma=np.eye(2)), "non-finite"),
])
def test_load_reference_stats_rejects_malformed_files(tmp_path, arrays, match):
    with pytest.raises(ValueError, match=match):
        load_reference_stats(_write_npz(tmp_path / "bad.npz", **arrays))
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "absent.npz")


def test_bootstrap_se_is_the_evaluations_sampling_noise_and_shrinks_with_more_images():
    from evaluators.metrics.fid import fid_bootstrap_se
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4000, 8))
    small, large = rng.normal(0.3, 1.0, size=(200, 8)), rng.normal(0.3, 1.0, size=(3200, 8))
    se_small, se_large = fid_bootstrap_se(small, ref), fid_bootstrap_se(large, ref)
    assert se_small == fid_bootstrap_se(small, ref)              # seeded: the same every call
    assert se_small > 0 and se_small / se_large > 2.5            # ~ sqrt(16) = 4 fewer images
    # independent draws of the generated set scatter by about that much
    draws = [fid_from_features(rng.normal(0.3, 1.0, size=(200, 8)), ref) for _ in range(40)]
    assert 0.5 < np.std(draws) / se_small < 2.0
