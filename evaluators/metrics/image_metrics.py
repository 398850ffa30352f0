"""Image-distribution metrics on Inception outputs, ADM ImageNet-256 protocol: IS, P/R, D/C, and FID glue.

Pure functions of feature arrays (N images, D feature dim; pool3 D=2048, logits 1008 classes):

- ``inception_score``: ADM/improved-GAN convention (softmax of the bias-free logits, splits of 5000
  images in file order, mean and std of the per-split exp(KL)).
- ``prdc``: precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020)
  from k-nearest-neighbour balls, computed in row blocks with ``torch.cdist`` so that 50k × 10k
  sets never build the full distance matrix (memory O(chunk × N)).
- ``ImageMetrics``: streams InceptionV3 outputs batch by batch and computes all of the above plus
  FID against reference statistics (``evaluators.metrics.fid.load_reference_stats``).

Paper convention: precision/recall with k=3 (ADM, torch-fidelity), density/coverage with k=5 (Naeem
et al.), reference set = the 10k ``arr_0`` images of the ADM reference batch (``load_reference_images``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evaluators.metrics.fid import RunningStats, frechet_distance

IS_SPLIT_SIZE = 5000
PR_K = 3
DC_K = 5


def inception_score(logits_unbiased: np.ndarray | torch.Tensor, split_size: int = IS_SPLIT_SIZE
                    ) -> tuple[float, float]:
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over splits; logits_unbiased [N, C] (C=1008).

    ADM convention: p(y|x) = softmax of the bias-free logits, splits of ``split_size`` consecutive
    images in the given (file) order, no shuffling; a last, shorter split is kept as ADM does, and
    fewer than ``split_size`` images form one split. ADM reports the mean; std is over splits
    (ddof=0). Computed in float64 from log-softmax, so saturated probabilities give 0·log 0 = 0.
    """
    logits = torch.as_tensor(logits_unbiased).to("cpu", torch.float64)
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"need logits [N >= 1, C], got {tuple(logits.shape)}")
    scores = []
    for start in range(0, logits.shape[0], split_size):
        log_p = torch.log_softmax(logits[start:start + split_size], dim=1)   # [n, C]
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(log_p.shape[0])   # log mean_x p(y|x)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _as_rows(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x).to(device, dtype)
    if t.dim() != 2:
        raise ValueError(f"need features [N, D], got {tuple(t.shape)}")
    return t


def _knn_radii(x: torch.Tensor, ks: set[int], chunk: int) -> dict[int, torch.Tensor]:
    """Distance of each row of x [N, D] to its k-th nearest other row, for each k in ks -> {k: [N]}.

    The row itself is in the candidate set at distance 0, so the k-th neighbour excluding self is
    the (k+1)-th smallest distance (index k after sorting), as in prdc and ADM.
    """
    k_max = max(ks)
    if x.shape[0] <= k_max:
        raise ValueError(f"need more than k={k_max} features, got {x.shape[0]}")
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, x.shape[0], chunk):
        nearest = torch.cdist(x[start:start + chunk], x).topk(k_max + 1, dim=1, largest=False).values
        for k in ks:
            parts[k].append(nearest[:, k])
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = PR_K,
         chunk: int = 1000, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
         k_dc: int | None = None) -> dict[str, float]:
    """Precision, recall, density, coverage of fake [Nf, D] against real [Nr, D] -> dict of floats.

    Radii are k-th nearest-neighbour distances within each set (self excluded); membership is
    ``distance <= radius`` (ADM, torch-fidelity; the ``prdc`` package uses ``<``, which differs only
    on exact ties).
      precision = fraction of fakes inside some real ball; recall = fraction of reals inside some
      fake ball; density = mean over fakes of (# real balls containing it) / k; coverage = fraction
      of reals whose nearest fake lies inside that real's ball.
    k is used for all four unless ``k_dc`` is given for density/coverage. Paper convention:
    precision/recall k=3, density/coverage k=5, i.e. ``prdc(real, fake, k=3, k_dc=5)``.

    Memory is O(chunk × max(Nr, Nf)): distances are computed in blocks of ``chunk`` rows and
    reduced at once (3 passes: real×real, fake×fake, fake×real). ``dtype`` float32 matches
    torch-fidelity's cdist; use float64 to compare with the float64 ``prdc`` package bit for bit.
    ``device`` defaults to the device of ``real`` if it is a tensor, else CPU.
    """
    k_dc = k if k_dc is None else k_dc
    if device is None:
        device = real.device if torch.is_tensor(real) else torch.device("cpu")
    device = torch.device(device)
    real_t, fake_t = _as_rows(real, device, dtype), _as_rows(fake, device, dtype)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature dims differ: real {real_t.shape[1]}, fake {fake_t.shape[1]}")
    real_radii = _knn_radii(real_t, {k, k_dc}, chunk)
    fake_radii = _knn_radii(fake_t, {k}, chunk)[k]
    r_pr, r_dc = real_radii[k], real_radii[k_dc]

    n_real, n_fake = real_t.shape[0], fake_t.shape[0]
    in_real = torch.zeros(n_fake, dtype=torch.bool, device=device)          # precision, per fake
    real_balls = torch.zeros(n_fake, dtype=torch.float64, device=device)    # density counts, per fake
    in_fake = torch.zeros(n_real, dtype=torch.bool, device=device)          # recall, per real
    nearest_fake = torch.full((n_real,), float("inf"), dtype=dtype, device=device)   # coverage
    for start in range(0, n_fake, chunk):
        d = torch.cdist(fake_t[start:start + chunk], real_t)                   # [c, Nr]
        rows = slice(start, start + d.shape[0])
        in_real[rows] = (d <= r_pr).any(1)
        real_balls[rows] = (d <= r_dc).sum(1).double()
        in_fake |= (d <= fake_radii[rows, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    return {"precision": in_real.double().mean().item(),
            "recall": in_fake.double().mean().item(),
            "density": (real_balls.mean() / k_dc).item(),
            "coverage": (nearest_fake <= r_dc).double().mean().item()}


def load_reference_images(path: str | Path) -> torch.Tensor:
    """The image batch ``arr_0`` of an ADM reference npz (uint8 NHWC) as uint8 [N, 3, H, W].

    ADM's reference for precision/recall is these 10k images' pool3 features (about 2 GB of images).
    """
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no image batch 'arr_0' (keys: {sorted(data.files)})")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class ImageMetrics:
    """Streams InceptionV3 outputs of generated images; computes FID, IS, P/R, D/C at the end.

    ``update`` takes the network's output dict for one batch ({"pool3": [B, 2048], "logits_unbiased":
    [B, 1008]}). FID statistics are float64 sums (``RunningStats``); pool3 features (50k × 2048
    float32 = 400 MB) and logits are kept for IS and the nearest-neighbour metrics.
    """

    def __init__(self) -> None:
        self.stats = RunningStats()
        self.pool3: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []

    def update(self, outputs: dict[str, torch.Tensor | np.ndarray]) -> None:
        pool3, logits = outputs["pool3"], outputs["logits_unbiased"]
        self.stats.update(pool3)
        self.pool3.append(torch.as_tensor(pool3).float().cpu().numpy())
        self.logits.append(torch.as_tensor(logits).float().cpu().numpy())

    @property
    def n(self) -> int:
        return self.stats.n

    def compute(self, ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_pool3: np.ndarray | None = None,
                chunk: int = 1000, device: str | torch.device | None = None) -> dict[str, float]:
        """{fid, is_mean, is_std, num_images[, precision, recall (k=3), density, coverage (k=5)]}.

        FID against (ref_mu [D], ref_sigma [D, D]); the nearest-neighbour metrics need the reference
        set's features ref_pool3 [Nr, D] (ADM: the 10k arr_0 images).
        """
        mu, sigma = self.stats.statistics()
        is_mean, is_std = inception_score(np.concatenate(self.logits))
        out = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "is_mean": is_mean, "is_std": is_std,
               "num_images": float(self.n)}
        if ref_pool3 is not None:
            out.update(prdc(ref_pool3, np.concatenate(self.pool3), k=PR_K, k_dc=DC_K, chunk=chunk,
                            device=device))
        return out
