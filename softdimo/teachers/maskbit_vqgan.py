"""MaskBit's tokenizer, ConvVQModel with the lookup-free quantizer (markweberdev/maskbit
``modeling/conv_vqgan.py``, ``modeling/modules/autoencoder.py``, ``modeling/quantizer/lookup_free.py``),
vendored for softdimo with the parameter names of the published ``maskbit_tokenizer_*bit.bin``.

Shapes: B batch, c = token_size latent channels (14 bits), h×w latent grid (16×16), H×W image
(256×256 = h·2^(num_resolutions−1)). The LFQ "codebook" is implicit: code k is its bits as ±1,
least significant bit first, so the decoder's input is a [B, c, h, w] tensor of ±1 (or, for soft
tokens, expected bits inside the cube). Images come out roughly in [0, 1] (callers clamp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvVQConfig:
    """The ``model.vq_model`` fields of a MaskBit yaml that shape the network (lookup-free only)."""
    token_size: int = 14
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple = (1, 1, 2, 2, 4)
    num_resolutions: int = 5
    num_res_blocks: int = 2
    num_res_blocks_decoder: int | None = None     # upstream reads it with .get(); None = num_res_blocks
    sample_with_conv: bool = True


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow-style "SAME" padding (extra pixel on the right/bottom when odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        (ph, pw) = pads
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as upstream (which refuses channel counts not divisible by 32)."""
    if channels % 32:
        raise ValueError(f"MaskBit's GroupNorm needs channels divisible by 32, got {channels}")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip. When the width changes, upstream's skip is
    ``nin_shortcut`` applied to the block's *output* (not its input); the published weights were
    trained that way, so it is kept."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = Conv2dSame(in_channels, out_channels, kernel_size=3, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = Conv2dSame(out_channels, out_channels, kernel_size=3, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2dSame(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(h) if self.in_channels != self.out_channels else x
        return h + skip


class ResidualStage(nn.Module):
    """``num_res_blocks`` residual blocks, the first one changing the width."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResidualBlock(in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_res_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class DownsamplingStage(ResidualStage):
    """Residual blocks, then ×1/2 by a strided conv (``sample_with_conv``) or average pooling."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int,
                 sample_with_conv: bool):
        super().__init__(in_channels, out_channels, num_res_blocks)
        self.sample_with_conv = sample_with_conv
        if sample_with_conv:
            self.down_conv = Conv2dSame(out_channels, out_channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.down_conv(x) if self.sample_with_conv else F.avg_pool2d(x, 2, 2)


class UpsamplingStage(ResidualStage):
    """Residual blocks, then ×2 nearest upsampling and a 3×3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int):
        super().__init__(in_channels, out_channels, num_res_blocks)
        self.upsample_conv = Conv2dSame(out_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(super().forward(x), scale_factor=2.0, mode="nearest")
        return self.upsample_conv(x)


class ConvEncoder(nn.Module):
    """Image [B, 3, H, W] -> continuous latents [B, c, h, w] (quantized by the sign afterwards)."""

    def __init__(self, config: ConvVQConfig):
        super().__init__()
        hc, n = config.hidden_channels, config.num_resolutions
        mult = (1,) + tuple(config.channel_mult)
        self.conv_in = Conv2dSame(config.num_channels, hc, kernel_size=3, bias=False)
        stages = []
        for level in range(n):
            cin, cout = hc * mult[level], hc * mult[level + 1]
            stages.append(DownsamplingStage(cin, cout, config.num_res_blocks, config.sample_with_conv)
                          if level < n - 1 else ResidualStage(cin, cout, config.num_res_blocks))
        self.down = nn.ModuleList(stages)
        self.mid = ResidualStage(cout, cout, config.num_res_blocks)
        self.norm_out = group_norm(cout)
        self.conv_out = Conv2dSame(cout, config.token_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class ConvDecoder(nn.Module):
    """Latent bits [B, c, h, w] -> image [B, 3, H, W] (upstream's non-legacy ConvDecoder)."""

    def __init__(self, config: ConvVQConfig):
        super().__init__()
        hc, n = config.hidden_channels, config.num_resolutions
        blocks = config.num_res_blocks_decoder or config.num_res_blocks
        mult = tuple(config.channel_mult) + (config.channel_mult[-1],)
        block_in = hc * config.channel_mult[n - 1]
        self.conv_in = Conv2dSame(config.token_size, block_in, kernel_size=3)
        self.mid = ResidualStage(block_in, block_in, blocks)
        stages = []
        for level in reversed(range(n)):               # up.0 is the coarsest level
            cin, cout = hc * mult[level + 1], hc * mult[level]
            stages.append(UpsamplingStage(cin, cout, blocks) if level > 0
                          else ResidualStage(cin, cout, blocks))
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(cout)
        self.conv_out = Conv2dSame(cout, config.num_channels, kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for stage in self.up:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LookupFreeQuantizer(nn.Module):
    """Sign quantization to ±1 bits; code k <-> bits of k, LSB first. Only its buffers are stored."""

    def __init__(self, token_bits: int):
        super().__init__()
        self.token_size = token_bits
        self.codebook_size = 2 ** token_bits
        self.register_buffer("bits_to_indices", (2 ** torch.arange(token_bits)).int())
        self.register_buffer("codebook", self.get_codebook_entry(torch.arange(self.codebook_size)))

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [...] -> bits [..., c] in {−1, +1}."""
        on = (indices.long()[..., None].int() & self.bits_to_indices) != 0
        return on.float() * 2.0 - 1.0

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, c, h, w] -> codes [B, h, w] (bit j set where channel j is positive)."""
        return ((z > 0).int() * self.bits_to_indices[:, None, None]).sum(1)


class ConvVQModel(nn.Module):
    """encoder / decoder / quantize, as the published state dict nests them."""

    def __init__(self, config: ConvVQConfig):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.decoder = ConvDecoder(config)
        self.quantize = LookupFreeQuantizer(config.token_size)

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> codes [B, h·w] (row-major)."""
        return self.quantize.indices(self.encoder(images)).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bits [B, c, h, w] (hard or expected) -> images [B, 3, H, W], not clamped."""
        return self.decoder(z)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes [B, h·w] (square grid, row-major) -> images [B, 3, H, W], not clamped."""
        side = math.isqrt(tokens.shape[1])
        bits = self.quantize.get_codebook_entry(tokens).unflatten(1, (side, side))
        return self.decode(bits.permute(0, 3, 1, 2).contiguous())
