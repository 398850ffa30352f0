"""FID maths against closed forms."""
import numpy as np
import pytest

from evaluators.fid import feature_statistics, fid_from_features, frechet_distance


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
