"""The FID Inception: same state-dict names/shapes and outputs as torch-fidelity's port, TF1 resize, loading.

torch-fidelity is used here only as the reference (the product never imports it). Its constructor
always loads weights, so it is built with the download and the load patched out, then given our
random weights (convs re-initialised with Kaiming so that features are not degenerate).
"""

import pytest
import torch
import torch.nn.functional as F

from evaluators.networks.inception import (INPUT_SIZE, InceptionV3, extract_features, load_inception,
                                  tf1_resize_bilinear)


pytestmark = pytest.mark.usefixtures("no_network")




def random_inception(seed: int = 0) -> InceptionV3:
    torch.manual_seed(seed)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):   # non-trivial BN so eps and stats are exercised
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net() -> InceptionV3:
    return random_inception()


@pytest.fixture(scope="module")
def reference(net):
    """torch-fidelity's FeatureExtractorInceptionV3 built offline and holding ``net``'s weights."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        ref = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    ref.load_state_dict(net.state_dict())
    return ref


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def outputs(net, images):
    with torch.inference_mode():
        return net(images)


def test_state_dict_names_and_shapes_equal_torch_fidelity(net, reference):
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert len(ours) == 566 and sum(p.numel() for p in net.parameters()) == 23_850_960


def test_outputs_equal_torch_fidelity_on_same_weights(reference, images, outputs):
    with torch.inference_mode():
        pool3, logits = reference(images)
    assert outputs["pool3"].shape == (3, 2048) and outputs["logits_unbiased"].shape == (3, 1008)
    assert outputs["pool3"].dtype == outputs["logits_unbiased"].dtype == torch.float32
    torch.testing.assert_close(outputs["pool3"], pool3, rtol=1e-4, atol=1e-4 * pool3.abs().max().item())
    torch.testing.assert_close(outputs["logits_unbiased"], logits, rtol=1e-4,
                               atol=1e-4 * logits.abs().max().item())
    # the random network still tells images apart (features are not collapsed)
    assert outputs["pool3"].std(0).mean() > 1e-3


def test_batch_size_does_not_change_features(net, images, outputs):
    with torch.inference_mode():
        single = torch.cat([net(images[i:i + 1])["pool3"] for i in range(2)])
    torch.testing.assert_close(single, outputs["pool3"][:2], rtol=1e-4, atol=1e-5)


def test_extract_features_batches_tensors_and_iterables(net, images, outputs):
    whole = extract_features(net, images, batch_size=2)        # batches of 2 and 1
    assert whole["pool3"].shape == (3, 2048) and whole["logits_unbiased"].shape == (3, 1008)
    torch.testing.assert_close(torch.from_numpy(whole["pool3"]), outputs["pool3"], rtol=1e-4, atol=1e-5)
    streamed = extract_features(net, iter([images[2:]]))
    torch.testing.assert_close(torch.from_numpy(streamed["logits_unbiased"]), outputs["logits_unbiased"][2:],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
                                 torch.zeros(3, 8, 8, dtype=torch.uint8)])
def test_only_uint8_rgb_batches_are_accepted(net, bad):
    with pytest.raises(TypeError, match="uint8"):
        net(bad)


def test_tf1_resize_is_identity_at_299_and_has_no_half_pixel_offset():
    x = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE) * 255
    assert torch.equal(tf1_resize_bilinear(x), x)
    # 1×2 -> 1×4: source coordinates 0, 0.5, 1, 1.5 (i·in/out, clamped at the edge); torch's
    # half-pixel interpolation would give 0, 2.5, 7.5, 10 instead
    row = torch.tensor([[[[0.0, 10.0]]]])
    assert tf1_resize_bilinear(row, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    assert F.interpolate(row, (1, 4), mode="bilinear", align_corners=False).flatten().tolist() != [0, 5, 10, 10]


@pytest.mark.parametrize("size", [(32, 32), (256, 256), (300, 97)])
def test_tf1_resize_equals_torch_fidelity_port(size):
    compat = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    expected = compat.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(tf1_resize_bilinear(x), expected)


def test_load_inception_reads_a_checkpoint_keyed_like_the_real_file(tmp_path, net, reference, images, outputs):
    # the fake checkpoint takes its key names from torch-fidelity's module, as the real file does;
    # converted checkpoints may lack BN's num_batches_tracked counters, so drop them
    state = {k: v.clone() for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images[:1])["pool3"], outputs["pool3"][:1], rtol=1e-5, atol=1e-6)


def test_load_inception_lists_missing_and_unexpected_keys(tmp_path, net):
    state = dict(net.state_dict())
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["fc.extra"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, 2048)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_inception(path)
    message = str(err.value)
    assert "Mixed_7c.branch_pool.conv.weight" in message and "fc.extra" in message and "fc.weight" in message


def test_load_inception_needs_an_existing_file(tmp_path, monkeypatch):
    from evaluators.networks.weights import WeightsMissing
    monkeypatch.delenv("SOFTDIMO_WEIGHTS", raising=False)
    with pytest.raises(WeightsMissing):
        load_inception(tmp_path / "absent.pth")
    with pytest.raises(WeightsMissing):
        load_inception()
