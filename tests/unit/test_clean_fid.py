"""fid30k through clean-fid (H.5): our in-memory call agrees with clean-fid's own entry point, and
differs from the ADM path exactly where the resize differs."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluators.metrics import clean_fid
from evaluators.networks.inception import tf1_resize_bilinear
from evaluators.networks.weights import WeightsMissing


class _Layers(nn.Module):
    """A small stand-in for the Inception trunk: [B, 3, 299, 299] -> [B, 2048, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 7, stride=4)
        self.proj = nn.Linear(16 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)
        return self.proj(h)[:, :, None, None]


class _Base(nn.Module):
    """The interface clean-fid's InceptionV3W expects of the TorchScript file: ``layers``."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    torch.jit.script(_Base()).save(str(folder / clean_fid.FILE_NAME))
    return clean_fid.load_extractor(folder / clean_fid.FILE_NAME)


def images(seed: int, n: int = 10, size: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, 8, 8, generator=g) * 255          # low-frequency content, then noise
    noise = 20 * torch.randn(n, 3, size, size, generator=g)
    x = nn.functional.interpolate(smooth, size=size, mode="bilinear") + noise
    return x.clamp(0, 255).round().to(torch.uint8)


def save(folder, batch: torch.Tensor):
    folder.mkdir()
    for i, img in enumerate(batch):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def test_features_are_clean_fids_own(extractor, tmp_path):
    """Our in-memory path gives exactly the features clean-fid's folder pipeline (the one
    compute_fid and make_custom_stats run) gives for the same images saved as PNG."""
    from cleanfid.fid import get_folder_features

    fake = images(1)
    save(tmp_path / "fake", fake)
    theirs = get_folder_features(str(tmp_path / "fake"), extractor, num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    ours = clean_fid.clean_features(fake, extractor, batch=4)   # the same batches: bitwise
    assert ours.shape == (10, 2048) and np.array_equal(ours, theirs)
    # clean-fid's custom-statistics format (npz mu, sigma) reads back the folder's statistics
    mu, sigma = clean_fid.reference_statistics(tmp_path / "fake", extractor)
    np.savez(tmp_path / "coco_clean.npz", mu=mu, sigma=sigma)
    mu2, sigma2 = clean_fid.reference_statistics(tmp_path / "coco_clean.npz", extractor)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert np.allclose(mu, theirs.mean(0)) and np.allclose(sigma, np.cov(theirs, rowvar=False))


def test_differs_from_the_adm_resize_only_where_the_resize_differs(extractor):
    at_299, at_256 = images(3, 4, 299), images(3, 4, 256)
    # 299 px in: neither resizes, the network sees the same pixels
    torch.testing.assert_close(clean_fid.clean_resize(at_299), tf1_resize_bilinear(at_299.float()))
    # 256 px in: PIL bicubic (clean) vs TF1 bilinear (ADM) give other inputs, other features
    clean, adm = clean_fid.clean_resize(at_256), tf1_resize_bilinear(at_256.float())
    assert (clean - adm).abs().mean() > 0.5
    assert not torch.allclose(extractor(clean), extractor(adm), atol=1e-4)


def test_generated_images_resized_to_256_first():
    big = images(4, 2, 512)
    small = clean_fid.to_generated_size(big)
    assert small.shape == (2, 3, 256, 256) and small.dtype == torch.uint8
    assert clean_fid.to_generated_size(small) is small


def test_missing_or_misnamed_inception_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissing) as err:
        clean_fid.load_extractor()
    assert "clean_fid_inception" in str(err.value) and "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    other.write_bytes(b"")
    with pytest.raises(WeightsMissing, match="must be named inception-2015-12-05.pt"):
        clean_fid.load_extractor(other)
