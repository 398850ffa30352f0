"""Fréchet distance between Gaussian fits of two feature sets (FID), as pure functions.

Features are [N, D] arrays; statistics are (mu [D], sigma [D, D]) in float64. The matrix square
root follows the ADM / clean-fid recipe (scipy ``sqrtm``; if the product is singular, retry with
eps on the diagonals; drop a negligible imaginary part, fail on a large one), so results match those
implementations on the same features. ``RunningStats`` accumulates the statistics batch by batch
(n, Σx, Σxxᵀ: sums, so shards combine by addition), and ``load_reference_stats`` reads reference
statistics files such as ADM's ``VIRTUAL_imagenet256_labeled.npz``.
"""
from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

# ADM / clean-fid tolerance on the diagonal of the imaginary part of sqrtm(sigma1·sigma2)
IMAGINARY_ATOL = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D], in float64; sigma is the unbiased covariance."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2·sqrt(sigma1·sigma2)), in float64.

    If sqrtm of the product is not finite (near-singular covariances, e.g. fewer samples than
    dimensions), eps·I is added to both covariances and it is retried, with a warning. An imaginary
    part on the diagonal larger than 1e-3 raises (the product is not close to PSD); a smaller one
    is numerical noise and dropped. Same recipe as ADM's evaluator and clean-fid.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    if sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"sigma {sigma1.shape} does not match mu {mu1.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of the covariance product is not finite; adding {eps} to the diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def fid_bootstrap_se(features1: np.ndarray, features2: np.ndarray, rounds: int = 20,
                     seed: int = 0) -> float:
    """Standard error of fid_from_features(features1, features2) from resampling features1 [N, D].

    The spread of FID over bootstrap resamples of the generated set: the evaluation's own sampling
    noise (which images were drawn), not the training seed's. Two runs whose FIDs differ by less than
    about twice this are not told apart by the evaluation.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(features1, dtype=np.float64)
    mu2, sigma2 = feature_statistics(features2)
    values = [frechet_distance(*feature_statistics(x[rng.integers(0, len(x), len(x))]), mu2, sigma2)
              for _ in range(rounds)]
    return float(np.std(values, ddof=1))


class RunningStats:
    """Streaming mean and unbiased covariance of features [N, D], as float64 sums (n, Σx, Σxxᵀ).

    Sums rather than running means so that shards (DDP ranks, evaluation workers) combine by
    addition (``merge`` or an all-reduce of ``total``/``outer``). The sums live on the device of the
    first batch, so GPU features are accumulated on the GPU. Cancellation in Σxxᵀ/n - mu·muᵀ costs
    about log10(|mu|²/var) digits of float64; for Inception pool3 features that is about one digit.
    """

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None    # Σx [D]
        self.outer: torch.Tensor | None = None    # Σxxᵀ [D, D]

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of features [N, D] (numpy or torch, any float dtype)."""
        x = torch.as_tensor(features)
        if x.dim() != 2:
            raise ValueError(f"need features [N, D], got {tuple(x.shape)}")
        if self.total is not None and x.shape[1] != self.total.shape[0]:
            raise ValueError(f"feature dim {x.shape[1]} != {self.total.shape[0]} of earlier batches")
        x = x.to(torch.float64, copy=False) if self.total is None else x.to(self.total.device, torch.float64)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer.addmm_(x.T, x)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator's sums into this one (e.g. from another worker); returns self."""
        if other.total is None:
            return self
        if self.total is None:
            self.total, self.outer = other.total.clone(), other.outer.clone()
        else:
            self.total += other.total.to(self.total.device)
            self.outer += other.outer.to(self.outer.device)
        self.n += other.n
        return self

    def mean(self) -> np.ndarray:
        """mu [D], float64."""
        if self.n < 1:
            raise ValueError("no features accumulated")
        return (self.total / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D], float64 (as ``np.cov(features, rowvar=False)``)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return ((sigma + sigma.T) / 2).cpu().numpy()   # exact symmetry, as np.cov's

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D])."""
        return self.mean(), self.cov()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (reference batches are ~2 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _npz_member_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """Shape of array ``key`` in an npz from its header only (ADM's arr_0 is 2 GB; do not load it)."""
    with zipfile.ZipFile(path) as z:
        if f"{key}.npy" not in z.namelist():
            return None
        with z.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    return tuple(shape)


def load_reference_stats(path: str | Path, symmetry_rtol: float = 1e-6
                         ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reference statistics from an npz with ``mu`` [D] and ``sigma`` [D, D] -> (mu, sigma, meta).

    Accepts ADM reference batches (mu, sigma, arr_0, mu_s, sigma_s, ...), clean-fid stats files and
    any npz with those two keys. Checks shapes, finiteness and symmetry of sigma. meta: path, sha256
    (record it with the results), keys, dim, and ``n_images``/``images_shape`` when the file holds
    the ADM image batch ``arr_0`` (read from its header, not loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        keys = sorted(data.files)
        if "mu" not in keys or "sigma" not in keys:
            raise ValueError(f"{path}: need arrays 'mu' and 'sigma', found {keys}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"{path}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain non-finite values")
    asym = np.abs(sigma - sigma.T).max()
    if asym > symmetry_rtol * max(np.abs(sigma).max(), np.finfo(np.float64).tiny):
        raise ValueError(f"{path}: sigma is not symmetric (max |sigma - sigmaᵀ| = {asym:.3g})")
    meta = {"path": str(path.resolve()), "sha256": file_sha256(path), "keys": keys, "dim": int(mu.shape[0])}
    if "arr_0" in keys:
        shape = _npz_member_shape(path, "arr_0")
        if shape is not None:
            meta.update(n_images=int(shape[0]), images_shape=list(shape))
    return mu, sigma, meta
