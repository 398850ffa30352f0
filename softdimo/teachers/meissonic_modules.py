"""Meissonic's transformer (viiika/Meissonic ``src/transformer.py`` ``Transformer2DModel``), re-written.

Upstream is not pip-installable and its blocks build diffusers' ``FluxAttnProcessor2_0``, which from
diffusers 0.35 on needs ``attn.head_dim`` (only ``FluxAttention`` has it) and fails. This module builds
the same network from diffusers 0.42 blocks (Attention, FeedForward, AdaLayerNormZero(Single),
RMSNorm, CombinedTimestepTextProjEmbeddings, TimestepEmbedding, Down/Upsample2D, and aMUSEd's
UVit2DConvEmbed and ConvMlmLayer) with the same parameter names as the published checkpoint
(``MeissonFlow/Meissonic/transformer``), and attention through ``LegacyFluxAttnProcessor``, the
pre-0.35 Flux attention maths. The soft-embedding entry and the micro-condition sinusoids are
``muse_common``'s, shared with the aMUSEd adapter.

Shapes: B batch, H×W token grid (64×64 at 1024 px), h×w = the grid after ``down_block`` (32×32),
N = h·w image positions inside the MM-DiT, T text tokens (77), D = heads·head_dim (1024),
V = codebook_size (8192), vocab = V + padding + [MASK] (8256; [MASK] = vocab − 1).

Data flow: ids [B,H,W] → ``embed`` (Embedding → RMSNorm → 1×1 conv) → ``down_block`` → tokens
[B,N,D] → RMSNorm + Linear → dual-stream blocks (image and text streams) → single-stream blocks on
[text; image] → image part → RMSNorm + Linear → [B,D,h,w] → ``up_block`` → ``mlm_layer`` → logits
[B,V,H,W].
The condition is CLIP-H hidden_states[-2] [B,T,1024] + text_embeds [B,1024] + 5 micro-conditions
(w, h, crop top, crop left, aesthetic score) + a timestep that the model multiplies by 1000.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import (CombinedTimestepTextProjEmbeddings, TimestepEmbedding,
                                         apply_rotary_emb, get_1d_rotary_pos_embed)
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle, RMSNorm
from diffusers.models.unets.uvit_2d import ConvMlmLayer, UVit2DConvEmbed
from diffusers.models.upsampling import Upsample2D

from softdimo.teachers.muse_common import embed_rows, pooled_with_micro_conds

# fixed inside upstream's constructor, not in config.json
LN_EPS = 1e-6
MICRO_COND_ENCODE_DIM = 256          # sinusoid width per micro-condition (as in aMUSEd)
MICRO_COND_EMBED_DIM = 5 * MICRO_COND_ENCODE_DIM
ROPE_THETA = 10000


@dataclass(frozen=True)
class MeissonicConfig:
    """The fields of ``transformer/config.json`` (defaults = upstream's constructor defaults)."""
    patch_size: int = 1                       # unused by the network (kept for the config file)
    in_channels: int = 64                     # unused by the network
    num_layers: int = 19                      # dual-stream (MM-DiT) blocks
    num_single_layers: int = 38               # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096           # text hidden-state width C
    pooled_projection_dim: int = 768          # pooled text width P; must equal D (see cond_embed)
    guidance_embeds: bool = False             # the published model has none; not supported
    axes_dims_rope: tuple = (16, 56, 56)      # RoPE dims per id axis, summing to head_dim
    vocab_size: int = 8256
    codebook_size: int = 8192
    downsample: bool = False
    upsample: bool = False

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "MeissonicConfig":
        """Read a diffusers config dict; ``_``-prefixed bookkeeping keys are ignored, others must be known."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"{source}: unknown Meissonic transformer config keys {unknown}")
        values = {k: v for k, v in raw.items() if k in names}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        config = cls(**values)
        if config.guidance_embeds:
            raise ValueError(f"{source}: guidance_embeds=true is not a published Meissonic model")
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(f"{source}: axes_dims_rope {config.axes_dims_rope} must sum to "
                             f"attention_head_dim {config.attention_head_dim}")
        if config.pooled_projection_dim != config.inner_dim:
            # upstream feeds cond_embed's D-wide output into a P-wide projection
            raise ValueError(f"{source}: pooled_projection_dim must equal heads·head_dim")
        return config

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1           # train_meissonic.py: mask_id = vocab_size - 1


class LegacyFluxAttnProcessor:
    """diffusers ≤0.34 ``FluxAttnProcessor2_0`` maths on a plain ``Attention``.

    Dual-stream (``encoder_hidden_states`` given): image and text projections, per-head RMS q/k norms,
    attention over [text; image] with RoPE on both, then ``to_out`` / ``to_add_out``. Single-stream
    (``pre_only`` attention): the same without the text branch or an output projection.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        batch = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:        # [B, S, D] -> [B, heads, S, head_dim]
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                             heads(attn.to_v(hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            # text first: the RoPE ids are cat(txt_ids, img_ids)
            query = torch.cat([c_query, query], dim=2)
            key = torch.cat([c_key, key], dim=2)
            value = torch.cat([c_value, value], dim=2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        context, image = out[:, :text_len], out[:, text_len:]
        image = attn.to_out[1](attn.to_out[0](image))
        return image, attn.to_add_out(context)


def rope_frequencies(ids: torch.Tensor, axes_dim: Sequence[int],
                     theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux RoPE tables for position ids [S, n_axes] -> (cos, sin), each [S, head_dim].

    Upstream ``FluxPosEmbed``: one interleaved 1-D RoPE per id axis, in float64, concatenated.
    """
    pos = ids.to(torch.float64)
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = zip(*(get_1d_rotary_pos_embed(dim, pos[:, i], theta=theta, use_real=True,
                                             repeat_interleave_real=True, freqs_dtype=dtype)
                     for i, dim in enumerate(axes_dim)))
    return torch.cat(cos, dim=-1).to(ids.device), torch.cat(sin, dim=-1).to(ids.device)


def image_position_ids(height: int, width: int, device=None) -> torch.Tensor:
    """Position ids [h·w, 3] = (0, row, col) of the internal grid, row-major (pipeline's img_ids)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


class TransformerBlock(nn.Module):
    """Dual-stream MM-DiT block: adaLN-Zero on both streams, joint attention, separate GELU MLPs."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = Attention(query_dim=dim, cross_attention_dim=None, added_kv_proj_dim=dim,
                              dim_head=attention_head_dim, heads=num_attention_heads, out_dim=dim,
                              context_pre_only=False, bias=True, processor=LegacyFluxAttnProcessor(),
                              qk_norm="rms_norm", eps=LN_EPS)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, N, D], text [B, T, D], temb [B, D] -> (text, image), upstream's order."""
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)
        attn_out, context_out = self.attn(hidden_states=x, encoder_hidden_states=c,
                                          image_rotary_emb=image_rotary_emb)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(x)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_out
        c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(c)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class SingleTransformerBlock(nn.Module):
    """Single-stream block on [text; image]: parallel attention and tanh-GELU MLP, one gated output."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = Attention(query_dim=dim, cross_attention_dim=None, dim_head=attention_head_dim,
                              heads=num_attention_heads, out_dim=dim, bias=True,
                              processor=LegacyFluxAttnProcessor(), qk_norm="rms_norm", eps=LN_EPS,
                              pre_only=True)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb) -> torch.Tensor:
        """[B, T+N, D] -> [B, T+N, D]."""
        x, gate = self.norm(hidden_states, emb=temb)
        mlp = self.act_mlp(self.proj_mlp(x))
        attn = self.attn(hidden_states=x, image_rotary_emb=image_rotary_emb)
        out = hidden_states + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class SimpleUVitBlock(nn.Module):
    """Optional 2× RMS-normed conv down- or transposed-conv up-sampling (upstream ``Simple_UVitBlock``)."""

    def __init__(self, channels: int, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = Downsample2D(
            channels, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, norm_type="rms_norm",
            eps=LN_EPS, elementwise_affine=True, bias=False) if downsample else None
        self.upsample = Upsample2D(
            channels, use_conv_transpose=True, kernel_size=2, padding=0, name="conv",
            norm_type="rms_norm", eps=LN_EPS, elementwise_affine=True, bias=False,
            interpolate=False) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Transformer2DModel(nn.Module):
    """Meissonic's masked-token transformer; state-dict names equal the published checkpoint's."""

    def __init__(self, config: MeissonicConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=dim, pooled_projection_dim=config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)])
        # aMUSEd's (diffusers') token embedding and output head; upstream: in_channels of the
        # embedding = D, no biases, affine RMSNorms with eps 1e-6
        self.embed = UVit2DConvEmbed(dim, dim, config.vocab_size, elementwise_affine=True, eps=LN_EPS,
                                     bias=False)
        self.mlm_layer = ConvMlmLayer(dim, dim, use_bias=False, ln_elementwise_affine=True,
                                      layer_norm_eps=LN_EPS, codebook_size=config.codebook_size)
        self.cond_embed = TimestepEmbedding(MICRO_COND_EMBED_DIM + config.pooled_projection_dim, dim,
                                            sample_proj_bias=False)
        self.encoder_proj_layer_norm = RMSNorm(dim, LN_EPS, True)
        self.project_to_hidden_norm = RMSNorm(dim, LN_EPS, True)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim, LN_EPS, True)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.down_block = SimpleUVitBlock(dim, config.downsample, False)
        self.up_block = SimpleUVitBlock(dim, False, config.upsample)

    @property
    def depth(self) -> int:
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    def internal_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid H×W -> the grid the MM-DiT sees (after ``down_block``)."""
        return (height // 2, width // 2) if self.config.downsample else (height, width)

    def conditioning(self, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                     micro_conds: torch.Tensor, timestep: torch.Tensor):
        """text [B, T, C], pooled [B, P], micro_conds [B, 5], timestep [B] or [1]
        -> (text tokens [B, T, D], temb [B, D]). The model multiplies ``timestep`` by 1000."""
        dtype = self.context_embedder.weight.dtype
        pooled = pooled_with_micro_conds(self.cond_embed, pooled_projections, micro_conds,
                                         MICRO_COND_ENCODE_DIM)
        temb = self.time_text_embed(timestep.to(dtype) * 1000, pooled)
        text = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states.to(dtype)))
        return text, temb

    def forward_from_embeddings(self, e: torch.Tensor, encoder_hidden_states: torch.Tensor,
                                pooled_projections: torch.Tensor, micro_conds: torch.Tensor,
                                timestep: torch.Tensor, layers: Sequence[int] = (),
                                img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None):
        """Run from ``embed.embeddings`` outputs e [B, H, W, D].

        Returns logits [B, V, H, W] and the image-stream hidden states [B, N, D] after each block in
        ``layers`` (dual-stream blocks first, then single-stream; negative indices from the end).
        """
        depth = self.depth
        wanted = sorted({i % depth for i in layers}) if depth else []
        if any(not -depth <= i < depth for i in layers):
            raise IndexError(f"layers {list(layers)} out of range for {depth} blocks")
        features: dict[int, torch.Tensor] = {}
        text, temb = self.conditioning(encoder_hidden_states, pooled_projections, micro_conds, timestep)

        x = self.down_block(embed_rows(self.embed, e))
        batch, channels, height, width = x.shape
        x = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        x = self.project_to_hidden(self.project_to_hidden_norm(x))

        if img_ids is None:
            img_ids = image_position_ids(height, width, x.device)
        if txt_ids is None:
            txt_ids = torch.zeros(text.shape[1], 3, device=x.device)
        rotary = rope_frequencies(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)

        for index, block in enumerate(self.transformer_blocks):
            text, x = block(x, text, temb, rotary)
            if index in wanted:
                features[index] = x
        stream = torch.cat([text, x], dim=1)
        offset = len(self.transformer_blocks)
        for index, block in enumerate(self.single_transformer_blocks, start=offset):
            stream = block(stream, temb, rotary)
            if index in wanted:
                features[index] = stream[:, text.shape[1]:]
        x = stream[:, text.shape[1]:]

        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        logits = self.mlm_layer(self.up_block(x))
        return logits, [features[i % depth] for i in layers]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor | None = None,
                txt_ids: torch.Tensor | None = None, micro_conds: torch.Tensor | None = None,
                return_dict: bool = True):
        """Upstream's call: ids [B, H, W] -> logits [B, V, H, W].

        Upstream quirk kept: ``return_dict=True`` returns the bare tensor, ``False`` a 1-tuple.
        """
        if img_ids is not None and img_ids.ndim == 3:       # upstream accepts (and warns about) 3-D ids
            img_ids = img_ids[0]
        if txt_ids is not None and txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        logits, _ = self.forward_from_embeddings(
            self.embed.embeddings(hidden_states), encoder_hidden_states, pooled_projections,
            micro_conds, timestep, img_ids=img_ids, txt_ids=txt_ids)
        return logits if return_dict else (logits,)
