"""The FID Inception network (TF graph of 2015-12-05) in plain PyTorch, loaded from a local file.

This is the network behind the ADM ImageNet-256 reference statistics, TTUR, clean-fid's
``legacy_tensorflow`` mode and torch-fidelity's ``inception-v3-compat``: InceptionV3 with the TF
graph's quirks (BatchNorm eps 1e-3, average pools that ignore padding, a max pool in the last block,
1008 classes) and TF1's bilinear resize to 299×299 (no half-pixel offset, no antialias) inside.

Parameter names and shapes equal the state dict in ``pt_inception-2015-12-05-6726825d.pth`` (the
torch-fidelity / pytorch-fid port), so that file loads with a strict key check. The architecture is
written as data (branch specs) rather than one class per block.

Shapes: B batch, H×W any input size; features D=2048 (pool3), 1008 logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: float [B,C,H,W] -> [B,C,h,w].

    TF1 maps output pixel i to source coordinate i·(in/out) (no half-pixel centre, so the image is
    shifted by up to half a pixel relative to ``F.interpolate``) and does no antialiasing. The scale,
    coordinates and fractions are float32 as in the TF kernel, and the lerps use its operation order
    (a + (b - a)·t), so the result is exact at equal sizes. Rows are lerped after columns: selecting
    rows commutes with the per-row column lerp, so this equals TF's four-corner formula.
    """
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"need a float [B,C,H,W] tensor, got {x.dtype} {tuple(x.shape)}")

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = src.floor()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.long().to(x.device), hi.long().to(x.device), (src - lo).to(x.device, x.dtype)

    x_lo, x_hi, dx = axis(x.shape[3], size[1])
    y_lo, y_hi, dy = axis(x.shape[2], size[0])
    left, right = x.index_select(3, x_lo), x.index_select(3, x_hi)
    rows = left + (right - left) * dx                      # [B,C,H,w]
    top, bottom = rows.index_select(2, y_lo), rows.index_select(2, y_hi)
    return top + (bottom - top) * dy[:, None]              # [B,C,h,w]


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps=1e-3, the TF graph's) -> ReLU; children named conv/bn like the file."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@dataclass(frozen=True)
class Conv:
    """One ConvBN of a branch: name (the state-dict attribute), output channels, kernel, stride, padding."""
    name: str
    c_out: int
    kernel: int | tuple[int, int] = 1
    stride: int = 1
    padding: int | tuple[int, int] = 0


@dataclass(frozen=True)
class Branch:
    """pool (optional) -> chain of convs -> optional fork of parallel convs whose outputs are concatenated.

    pool: "avg" = 3×3/1 average excluding padding (TF's SAME average pool), "max" = 3×3/1 max
    (TF's last block), "down" = 3×3/2 max without convs (the reduction blocks).
    """
    convs: tuple[Conv, ...] = ()
    pool: str | None = None
    fork: tuple[Conv, ...] = ()


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if kind == "down":
        return F.max_pool2d(x, 3, stride=2)
    raise ValueError(kind)


class Mixed(nn.Module):
    """An Inception block: branches run on the same input; outputs concatenated on channels in order."""

    def __init__(self, c_in: int, branches: list[Branch]):
        super().__init__()
        self.branches = branches
        for b in branches:
            c = c_in
            for conv in b.convs:
                self.add_module(conv.name, ConvBN(c, conv.c_out, conv.kernel, conv.stride, conv.padding))
                c = conv.c_out
            for conv in b.fork:
                self.add_module(conv.name, ConvBN(c, conv.c_out, conv.kernel, conv.stride, conv.padding))
        self.c_out = sum(self._branch_width(b, c_in) for b in branches)

    @staticmethod
    def _branch_width(b: Branch, c_in: int) -> int:
        if b.fork:
            return sum(conv.c_out for conv in b.fork)
        return b.convs[-1].c_out if b.convs else c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for b in self.branches:
            h = _pool(x, b.pool) if b.pool else x
            for conv in b.convs:
                h = self._modules[conv.name](h)
            if b.fork:
                h = torch.cat([self._modules[conv.name](h) for conv in b.fork], 1)
            outs.append(h)
        return torch.cat(outs, 1)


def _block_a(pool_features: int) -> list[Branch]:
    """35×35 block (Mixed_5b-d)."""
    return [Branch((Conv("branch1x1", 64),)),
            Branch((Conv("branch5x5_1", 48), Conv("branch5x5_2", 64, 5, padding=2))),
            Branch((Conv("branch3x3dbl_1", 64), Conv("branch3x3dbl_2", 96, 3, padding=1),
                    Conv("branch3x3dbl_3", 96, 3, padding=1))),
            Branch((Conv("branch_pool", pool_features),), pool="avg")]


def _block_b() -> list[Branch]:
    """35 -> 17 reduction (Mixed_6a)."""
    return [Branch((Conv("branch3x3", 384, 3, stride=2),)),
            Branch((Conv("branch3x3dbl_1", 64), Conv("branch3x3dbl_2", 96, 3, padding=1),
                    Conv("branch3x3dbl_3", 96, 3, stride=2))),
            Branch(pool="down")]


def _block_c(c7: int) -> list[Branch]:
    """17×17 block with factorised 7×7 convolutions (Mixed_6b-e)."""
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    return [Branch((Conv("branch1x1", 192),)),
            Branch((Conv("branch7x7_1", c7), Conv("branch7x7_2", c7, **row),
                    Conv("branch7x7_3", 192, **col))),
            Branch((Conv("branch7x7dbl_1", c7), Conv("branch7x7dbl_2", c7, **col),
                    Conv("branch7x7dbl_3", c7, **row), Conv("branch7x7dbl_4", c7, **col),
                    Conv("branch7x7dbl_5", 192, **row))),
            Branch((Conv("branch_pool", 192),), pool="avg")]


def _block_d() -> list[Branch]:
    """17 -> 8 reduction (Mixed_7a)."""
    return [Branch((Conv("branch3x3_1", 192), Conv("branch3x3_2", 320, 3, stride=2))),
            Branch((Conv("branch7x7x3_1", 192), Conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3)),
                    Conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0)),
                    Conv("branch7x7x3_4", 192, 3, stride=2))),
            Branch(pool="down")]


def _block_e(pool: str) -> list[Branch]:
    """8×8 block with split 1×3/3×1 outputs; Mixed_7b pools by average, Mixed_7c by max (TF-graph quirk)."""
    def split(prefix: str) -> tuple[Conv, Conv]:
        return (Conv(f"{prefix}a", 384, (1, 3), padding=(0, 1)),
                Conv(f"{prefix}b", 384, (3, 1), padding=(1, 0)))
    return [Branch((Conv("branch1x1", 320),)),
            Branch((Conv("branch3x3_1", 384),), fork=split("branch3x3_2")),
            Branch((Conv("branch3x3dbl_1", 448), Conv("branch3x3dbl_2", 384, 3, padding=1)),
                   fork=split("branch3x3dbl_3")),
            Branch((Conv("branch_pool", 192),), pool=pool)]


class InceptionV3(nn.Module):
    """FID Inception: uint8 images [B,3,H,W] -> {"pool3": [B,2048], "logits_unbiased": [B,1008]} (float32).

    Inside: float32, TF1 bilinear resize to 299×299, (x - 128) / 128, the network. ``logits_unbiased``
    is pool3 @ fc.weightᵀ without the bias: the input of the Inception Score (ADM, torch-fidelity).
    On CUDA, PyTorch runs float32 convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``);
    turn that off for features that match the CPU / TF-graph numbers closely.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        c = 192
        blocks = [("Mixed_5b", _block_a(32)), ("Mixed_5c", _block_a(64)), ("Mixed_5d", _block_a(64)),
                  ("Mixed_6a", _block_b()), ("Mixed_6b", _block_c(128)), ("Mixed_6c", _block_c(160)),
                  ("Mixed_6d", _block_c(160)), ("Mixed_6e", _block_c(192)), ("Mixed_7a", _block_d()),
                  ("Mixed_7b", _block_e("avg")), ("Mixed_7c", _block_e("max"))]
        self.block_names = tuple(name for name, _ in blocks)
        for name, branches in blocks:
            block = Mixed(c, branches)
            self.add_module(name, block)
            c = block.c_out
        assert c == FEATURE_DIM
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"expected uint8 images [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float())
        # NHWC activations: oneDNN/cuDNN convs run faster in it (1.4x measured on CPU); the features
        # move by ~1e-6 relative (float32 summation order), well inside the 1e-4 port tolerance
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)                                    # 147 -> 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                                    # 71 -> 35
        for name in self.block_names:
            x = self._modules[name](x)
        pool3 = x.mean(dim=(2, 3))                                          # [B,2048]
        return {"pool3": pool3.float(), "logits_unbiased": (pool3 @ self.fc.weight.T).float()}


def _checked_state_dict(net: nn.Module, state: dict, source: str) -> dict:
    """Raise listing missing/unexpected keys and shape mismatches; fill BN's num_batches_tracked.

    ``num_batches_tracked`` is a training counter that eval-mode BatchNorm never reads and that
    converted checkpoints may omit, so only it may be absent.
    """
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs net {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{source} does not match the FID Inception network:\n"
                         f"  missing keys ({len(missing)}): {missing}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
                         f"  shape mismatches ({len(mismatched)}): {mismatched}")
    return {**{k: expected[k] for k in optional - set(state)}, **state}


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """The FID Inception from ``path`` (else the staged weights key "inception"), in eval mode, frozen."""
    from evaluators.networks.weights import resolve   # lazy: the registry is only needed when loading weights

    file = resolve("inception", path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = InceptionV3()
    net.load_state_dict(_checked_state_dict(net, state, str(file)), strict=True)
    return net.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def extract_features(net: InceptionV3, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 100,
                     device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Run uint8 images [N,3,H,W] (a tensor, or an iterable of such batches) through ``net`` in batches.

    Returns {"pool3": [N,2048] float32, "logits_unbiased": [N,1008] float32} as numpy arrays, in input order.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) \
        if torch.is_tensor(images) else images
    out: dict[str, list[np.ndarray]] = {"pool3": [], "logits_unbiased": []}
    for batch in batches:
        feats = net(batch.to(device, non_blocking=True))
        for key in out:
            out[key].append(feats[key].cpu().numpy())
    if not out["pool3"]:
        raise ValueError("no images")
    return {k: np.concatenate(v) for k, v in out.items()}
