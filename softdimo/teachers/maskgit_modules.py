"""MaskGIT v1 networks, written for softdimo with the parameter names of the published weights.

The teacher of Di[M]O and Soft-Di[M]O is valeoai/Maskgit-pytorch **branch v1.0** (the main branch is
now Halton-MaskGIT, a different network). Two pieces are needed, and both are rebuilt here so that
the published state dicts load strictly (teachers.md §2):

- ``MaskTransformer`` (``v1.0:Network/transformer.py``): one embedding table ``tok_emb`` holds the K
  image codes, [MASK] = K, the classes K+1+y and the null class K+1+nclass; the class token is
  appended after the L = f_factor² image tokens; learned ``pos_emb``; ``first_layer`` (LN, Linear,
  GELU, LN, Linear), pre-norm attention/MLP blocks, ``last_layer``; logits = x @ tok_emb.weightᵀ + bias
  (weight tying), of which upstream keeps [B, L, K+1] (the mask column included).
- The decode side of the taming VQGAN f16 (``Network/Taming``): ``quantize.embedding`` (codebook
  [K, C]), ``post_quant_conv`` and the taming ``Decoder``. The encoder, ``quant_conv`` and the
  training loss are not needed to decode and are not built.

Shapes: B batch, L image tokens, K codes, D transformer width, C codebook width, h×w token grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- transformer


class PreNorm(nn.Module):
    """LayerNorm, then ``fn``: the pre-norm wrapper (keys ``norm.*`` and ``fn.*``)."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    """MLP D -> mlp_dim -> D; ``net`` indices 0 and 3 are the Linears, as upstream."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Full bidirectional self-attention through ``nn.MultiheadAttention`` (keys ``mha.in_proj_*``)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, num_heads=heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upstream also returns the attention map for plots; without it torch can use fused kernels.
        return self.mha(x, x, x, need_weights=False)[0]


class TransformerEncoder(nn.Module):
    """``layers[i]`` = [PreNorm(Attention), PreNorm(FeedForward)], each with a residual."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dropout)),
                           PreNorm(dim, FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth))


class MaskTransformer(nn.Module):
    """MaskGIT v1's bidirectional transformer. Published 256-px model: the defaults (174 M params).

    ``img_size`` is kept for parity with upstream, which ignores it too: the token grid is
    ``f_factor`` × ``f_factor`` (tokens per side, not the VQGAN downsampling factor).
    """

    def __init__(self, img_size: int = 256, hidden_dim: int = 768, codebook_size: int = 1024,
                 f_factor: int = 16, depth: int = 24, heads: int = 16, mlp_dim: int = 3072,
                 dropout: float = 0.1, nclass: int = 1000):
        super().__init__()
        self.img_size, self.nclass = img_size, nclass
        self.patch_size, self.codebook_size = f_factor, codebook_size
        self.seq_len = f_factor * f_factor
        rows = codebook_size + 1 + nclass + 1            # codes, [MASK], classes, null class
        self.tok_emb = nn.Embedding(rows, hidden_dim)
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.seq_len + 1, hidden_dim),
                                                          0.0, 0.02))
        self.first_layer = nn.Sequential(
            nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(), nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim))
        self.transformer = TransformerEncoder(hidden_dim, depth, heads, mlp_dim, dropout)
        self.last_layer = nn.Sequential(
            nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(), nn.LayerNorm(hidden_dim, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(self.seq_len + 1, rows))

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def class_ids(self, y: torch.Tensor) -> torch.Tensor:
        """Class labels [B] (``nclass`` = the null class) -> their ``tok_emb`` rows K+1+y, a new tensor."""
        return y.long() + (self.codebook_size + 1)

    def forward_embeddings(self, e: torch.Tensor, y: torch.Tensor, layers: Sequence[int] = ()
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image-token embeddings e [B, L, D] (the ``tok_emb`` output) and labels y [B] ->
        (logits [B, L, K+1] with the mask column, hidden states [B, L, D] after each block in
        ``layers``; the class position is dropped from both)."""
        depth = len(self.transformer.layers)
        for i in layers:
            if not -depth <= i < depth:
                raise IndexError(f"layer {i} out of range for {depth} blocks")
        wanted = {i % depth for i in layers}
        cls = self.tok_emb(self.class_ids(y))[:, None]                    # [B, 1, D]
        x = torch.cat([e, cls.to(e.dtype)], dim=1) + self.pos_emb
        x = self.first_layer(x)
        hidden = {}
        for i, (attn, ff) in enumerate(self.transformer.layers):
            x = x + attn(x)
            x = x + ff(x)
            if i in wanted:
                hidden[i] = x[:, :self.seq_len]
        x = self.last_layer(x[:, :self.seq_len])                           # per-position from here
        keep = self.codebook_size + 1
        logits = x @ self.tok_emb.weight[:keep].T + self.bias[:self.seq_len, :keep]
        return logits, [hidden[i % depth] for i in layers]

    def forward(self, img_token: torch.Tensor, y: torch.Tensor,
                drop_label: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's call: tokens [B, f, f] or [B, L], labels y [B], drop_label [B] bool (True -> null
        class) -> logits [B, L, K+1]. ``y`` is never modified."""
        y = y.long()
        if drop_label is not None:
            y = torch.where(drop_label.to(y.device), torch.full_like(y, self.nclass), y)
        return self.forward_embeddings(self.tok_emb(img_token.reshape(y.shape[0], -1)), y)[0]


# ----------------------------------------------------------------------------- taming VQGAN decoder


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """taming ResnetBlock without a time embedding: GN-swish-conv twice, 1×1 ``nin_shortcut`` when
    the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1-conv q, k, v and ``proj_out``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)                        # softmax(qkᵀ/√c) v
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 conv (taming's ``resamp_with_conv=True``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming ``Decoder`` (ddconfig names): z [B, z_channels, h, w] -> x [B, out_ch, h·2ⁿ, w·2ⁿ] in
    about [-1, 1], n = len(ch_mult) − 1. ``up[i]`` is listed from the finest level, as upstream
    stores it; attention follows every block at the resolutions in ``attn_resolutions``."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        ups = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer2(nn.Module):
    """The codebook of taming's VectorQuantizer2 (``embedding`` [K, C]); only its lookup is needed."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)


class VQGANDecoder(nn.Module):
    """The decode path of taming's VQModel: codebook lookup (hard) or p @ codebook (soft), then
    ``post_quant_conv`` and ``decoder``. Keys: ``quantize.embedding.weight``, ``post_quant_conv.*``,
    ``decoder.*`` (the decoder-side part of a VQModel ``state_dict``)."""

    def __init__(self, n_embed: int, embed_dim: int, ddconfig: dict):
        super().__init__()
        self.quantize = VectorQuantizer2(n_embed, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.decoder = Decoder(**ddconfig)
        self.downsampling = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, C, h, w] -> images [B, 3, H, W] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_latents(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Row-major latents [B, L, C] on an h×w grid -> images [B, 3, H, W] in about [-1, 1]."""
        return self.decode(z.reshape(z.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous())
