"""fid30k equals clean-fid's own compute_fid on the same small image sets (two 2048² matrix square
roots: tens of seconds on a quiet CPU, minutes on a loaded one, hence an e2e test)."""
import pytest
import torch

from evaluators.metrics import clean_fid
from tests.unit.test_clean_fid import extractor, images, save   # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_fid30k_agrees_with_clean_fids_compute_fid(extractor, tmp_path):   # noqa: F811
    from cleanfid import fid as cleanfid

    fake, real = images(1), images(2)
    save(tmp_path / "fake", fake)
    save(tmp_path / "real", real)
    theirs = cleanfid.compute_fid(str(tmp_path / "fake"), str(tmp_path / "real"), mode="clean",
                                  custom_feat_extractor=extractor, num_workers=0, batch_size=4,
                                  device=torch.device("cpu"), verbose=False, use_dataparallel=False)
    ours = clean_fid.fid30k(fake, tmp_path / "real", extractor)
    assert ours == pytest.approx(theirs, rel=1e-6) and ours > 0
