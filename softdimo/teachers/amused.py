"""aMUSEd (amused/amused-256, amused/amused-512) behind the Teacher protocol (teachers.md §6).

The networks are diffusers' own ``UVit2DModel`` (the MDM φ) and ``VQModel`` (the tokenizer), each
built from its ``config.json`` and loaded strictly from ``diffusion_pytorch_model.safetensors``; the
deprecated ``AmusedPipeline`` is not used. Shapes: B batch, L = h·w token positions (row-major over
the h×w latent grid), V codebook size (8192), D embedding width (``in_channels``, 768), T text
tokens (77), C text width (768), P pooled text width (768).

Soft embeddings enter at ``embed.embeddings`` (the token table, before the RMSNorm), so one-hot
probabilities reproduce the hard path exactly (teachers.md §1, §9.7). The 512 variant downsamples
the h×w grid by 2 before its transformer layers, so ``feature_len`` is then L/4.

The condition layout ([B, T+1, max(C, P)], ``muse_common.pack_text``), the embedding table
helpers, VQ decoding, CLIP/precomputed text and the sampler are ``muse_common.MuseTeacher``'s;
this module adds UVit2DModel's forward, the float32 rounding of the cosine schedule that makes
``sample`` bit-exact with ``AmusedScheduler``, and the loader. The five micro-conditions (width,
height, crop top, crop left, aesthetic score 6) are constants of the adapter, as in the pipeline.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from softdimo.teachers import TeacherOptionError
from softdimo.teachers.muse_common import (MuseTeacher, check_options, embed_rows, load_diffusers,
                                           load_text_source, number_option, pooled_with_micro_conds,
                                           vq_scale)

# AmusedPipeline.__call__ defaults: 12 steps, guidance 10, Gumbel temperature (2, 0), no softmax
# temperature on the token draw
SAMPLING = {"steps": 12, "cfg": 10.0, "temperature": 1.0, "randomize": 2.0}
OPTIONS = {"aesthetic_score": 6.0, "crop_coord": (0, 0)}
SOURCE = "an aMUSEd diffusers folder"

TextEncoder = Callable[[list[str]], object]


class AmusedTeacher(MuseTeacher):
    """Teacher protocol over a frozen UVit2DModel φ, its VQModel and a CLIP text source."""

    family = "aMUSEd"

    def __init__(self, transformer: nn.Module, vqvae: nn.Module, mask_id: int,
                 text_encoder: TextEncoder | None = None, aesthetic_score: float = 6.0,
                 crop_coord: Sequence[int] = (0, 0)):
        tc = transformer.config
        if not tc.codebook_size <= mask_id < tc.vocab_size:
            raise ValueError(f"mask id {mask_id} must be a non-code row of the {tc.vocab_size}-row "
                             f"token table (codes are 0..{tc.codebook_size - 1})")
        if tc.micro_cond_embed_dim != 5 * tc.micro_cond_encode_dim:
            raise ValueError("micro_cond_embed_dim must be 5 × micro_cond_encode_dim (5 micro-conds)")
        side = int(tc.sample_size)                              # latent grid side h = w
        image_size = side * vq_scale(vqvae)
        super().__init__(transformer, vqvae, text_encoder, codebook_size=tc.codebook_size,
                         mask_id=mask_id, grid=side, text_dims=(tc.encoder_hidden_size, tc.cond_embed_dim),
                         micro=(image_size, image_size, crop_coord[0], crop_coord[1], aesthetic_score))
        self.depth: int = tc.num_hidden_layers
        self.hidden_width: int = tc.hidden_size
        inner = side // 2 if tc.downsample else side            # Downsample2D: kernel 2, stride 2
        self.feature_len: int = inner * inner
        self.image_size: int = image_size
        self.sampling: dict = dict(SAMPLING)

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ (a UVit2DModel) from token-table rows e [B, L, D].

        Follows ``UVit2DModel.forward`` submodule by submodule, starting after the table lookup, so
        that a deep copy behaves the same. Returns logits [B, L, V] and the hidden states
        [B, feature_len, hidden_width] after each transformer layer in ``layers``.
        """
        if any(not -self.depth <= i < self.depth for i in layers):
            raise IndexError(f"layers {tuple(layers)} out of range for {self.depth} transformer layers")
        wanted = {i % self.depth for i in layers}
        b = e.shape[0]
        h, w = self.grid_shape
        text, pooled = self._unpack(cond)
        text = net.encoder_proj_layer_norm(net.encoder_proj(text))
        micro = self.micro_conds(b, text.device, text.dtype)
        pooled = pooled_with_micro_conds(net.cond_embed, pooled, micro,
                                         net.config.micro_cond_encode_dim).to(text.dtype)
        kwargs = dict(pooled_text_emb=pooled, encoder_hidden_states=text, cross_attention_kwargs=None)

        x = net.down_block(embed_rows(net.embed, e.reshape(b, h, w, -1)), **kwargs)   # [B, c, h', w']
        _, c, hh, ww = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        x = net.project_to_hidden(net.project_to_hidden_norm(x))          # [B, h'w', hidden]
        features = {}
        for i, layer in enumerate(net.transformer_layers):
            x = layer(x, encoder_hidden_states=text, added_cond_kwargs={"pooled_text_emb": pooled})
            if i in wanted:
                features[i] = x
        x = net.project_from_hidden(net.project_from_hidden_norm(x))
        x = net.up_block(x.reshape(b, hh, ww, c).permute(0, 3, 1, 2), **kwargs)
        logits = net.mlm_layer(x)                                          # [B, V, h, w]
        return logits.flatten(2).transpose(1, 2), [features[i % self.depth] for i in layers]

    def mask_count(self, step: int, steps: int, length: int) -> int:
        """⌊L·cos(π/2·(step+1)/N)⌋ in float32, as ``AmusedScheduler.step`` computes it: e.g.
        cos(π/3) rounds below 1/2 there, which moves ⌊·⌋, so seeded runs match the scheduler's."""
        ratio = torch.cos((torch.tensor([[step + 1]]) / steps) * math.pi / 2)
        return int((length * ratio).floor())


# ---------------------------------------------------------------------- loading
def _mask_id(folder: Path, vocab_size: int) -> int:
    """The scheduler's mask_token_id (8255 for both published models), else the last table row."""
    config = folder / "scheduler" / "scheduler_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["mask_token_id"])
    return vocab_size - 1


def _options(options: dict) -> dict:
    out = check_options(options, OPTIONS, "aMUSEd")
    crop = out["crop_coord"]
    if not isinstance(crop, (list, tuple)) or len(crop) != 2:
        raise TeacherOptionError("teacher.options.crop_coord", "must be [top, left]")
    out["aesthetic_score"] = number_option("aesthetic_score", out["aesthetic_score"])
    return out


def load(paths: dict[str, Path], options: dict, device) -> AmusedTeacher:
    """The aMUSEd teacher from ``paths["folder"]`` (and optionally ``paths["text_features"]``), frozen.

    options: ``aesthetic_score`` (micro-condition, default 6) and ``crop_coord`` ([top, left],
    default [0, 0]). Text comes from ``text_features`` when given (then text_encoder/ is not
    loaded), else from the folder's text_encoder/ + tokenizer/ when both exist.
    """
    from diffusers import UVit2DModel, VQModel

    opts = _options(options)
    folder = Path(paths["folder"])
    transformer = load_diffusers(UVit2DModel, folder, "transformer", SOURCE)
    vqvae = load_diffusers(VQModel, folder, "vqvae", SOURCE)
    text = load_text_source(paths, folder, device)
    teacher = AmusedTeacher(transformer, vqvae, _mask_id(folder, transformer.config.vocab_size), text,
                            aesthetic_score=opts["aesthetic_score"], crop_coord=opts["crop_coord"])
    return teacher.to(device)
