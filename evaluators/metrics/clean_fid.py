"""FID-30k on COCO / MJHQ as the paper measures it (H.5): through clean-fid, in its "clean" mode.

H.5: the 30k generated images are "resized to 256×256 and compared with 40,504 real images from the
same validation set using clean-FID". clean-fid's clean mode resizes each uint8 image to 299×299
with PIL's bicubic filter (antialiased, on float32 channels, no quantisation after) and feeds it to
the StyleGAN2-ADA TorchScript port of the TF-2015 Inception (``(x − 128) / 128`` inside). That is
not the ADM protocol of ``evaluators.networks.inception`` (TF1 bilinear resize without antialiasing inside
the network), which stays the ImageNet FID-5k/50k path.

Everything numerical is clean-fid's own code (``cleanfid.resize.build_resizer("clean")``,
``cleanfid.inception_torchscript.InceptionV3W``, ``cleanfid.fid.get_folder_features`` for reference
folders, ``cleanfid.fid.frechet_distance``); this module only feeds it in-memory images and a local
Inception file. The file comes from ``$SOFTDIMO_WEIGHTS`` (``evaluators.networks.weights`` key
``clean_fid_inception``) and is a TorchScript archive, read with ``torch.jit.load``; nothing is
downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

FILE_NAME = "inception-2015-12-05.pt"     # the name clean-fid's InceptionV3W opens in its folder
GENERATED_SIZE = 256                      # H.5: outputs resized to 256×256 before clean-fid
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def load_extractor(path: str | Path | None = None, device: str | torch.device = "cpu") -> FeatureFn:
    """clean-fid's clean-mode feature extractor from a local TorchScript file.

    ``path``: the file (named ``inception-2015-12-05.pt``, as clean-fid expects) or None for the
    staged one. Returns images [B, 3, 299, 299] float in [0, 255] -> pool3 features [B, 2048].
    """
    from cleanfid.inception_torchscript import InceptionV3W

    from evaluators.networks.weights import WeightsMissing, resolve

    file = resolve("clean_fid_inception", path)
    if file.name != FILE_NAME:
        error = WeightsMissing(f"clean_fid_inception: {file} must be named {FILE_NAME} "
                               "(clean-fid opens that name in its folder)")
        error.key, error.path = "clean_fid_inception", file
        raise error
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
    return lambda x: model(x.to(device))


def clean_resize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, 299, 299] in [0, 255] through clean-fid's clean resizer
    (exactly what its folder pipeline does to a decoded PNG)."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    out = [torch.from_numpy(resize(img.permute(1, 2, 0).numpy()).transpose(2, 0, 1).copy())
           for img in images_u8.cpu()]
    return torch.stack(out)


def to_generated_size(images_u8: torch.Tensor, size: int = GENERATED_SIZE) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, size, size] with PIL bicubic (H.5's 256×256, as a PNG
    written at that size); images already that size are returned unchanged."""
    from PIL import Image

    if images_u8.shape[-2:] == (size, size):
        return images_u8
    out = [torch.from_numpy(np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).resize(
        (size, size), Image.BICUBIC))).permute(2, 0, 1) for img in images_u8.cpu()]
    return torch.stack(out)


@torch.no_grad()
def clean_features(images_u8: torch.Tensor, extractor: FeatureFn, batch: int = 64) -> np.ndarray:
    """Clean-mode pool3 features [N, 2048] (float32, as clean-fid returns them) of uint8 images."""
    feats = []
    for start in range(0, images_u8.shape[0], batch):
        x = clean_resize(images_u8[start:start + batch])
        feats.append(extractor(x).detach().cpu().numpy())
    return np.concatenate(feats)


def reference_statistics(reference: str | Path, extractor: FeatureFn,
                         device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the real side: a folder of images (clean-fid's ``get_folder_features``, e.g.
    the 40,504 COCO-2014 val images at 256 px) or an npz with ``mu`` and ``sigma`` (clean-fid's
    ``make_custom_stats`` format)."""
    from cleanfid.fid import get_folder_features

    path = Path(reference)
    if path.is_dir():
        feats = get_folder_features(str(path), extractor, num_workers=0, batch_size=64,
                                    device=torch.device(device), mode="clean", verbose=False)
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    with np.load(path, allow_pickle=False) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path}: expected clean-fid statistics with 'mu' and 'sigma', "
                             f"found {sorted(stats.files)}")
        return stats["mu"], stats["sigma"]


def fid30k(images_u8: torch.Tensor, reference: str | Path, extractor: FeatureFn,
           device: str | torch.device = "cpu",
           reference_stats: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """FID of generated uint8 images against ``reference`` (folder or npz), clean-fid clean mode,
    after H.5's resize to 256×256. ``reference_stats`` skips recomputing the reference side."""
    from cleanfid.fid import frechet_distance

    feats = clean_features(to_generated_size(images_u8), extractor)
    mu_r, sigma_r = reference_stats or reference_statistics(reference, extractor, device)
    return float(frechet_distance(np.mean(feats, axis=0), np.cov(feats, rowvar=False), mu_r, sigma_r))
