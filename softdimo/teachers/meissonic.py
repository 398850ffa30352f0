"""Meissonic (MeissonFlow/Meissonic, 1024 px text-to-image MDM) behind the Teacher protocol.

Shapes: B batch, L = 64·64 = 4096 token positions (row-major), V = 8192 codes, D = 1024 embedding
width, T = 77 text tokens, C = 1024 CLIP-H width, N = 32·32 = 1024 positions inside the MM-DiT.

Files (``teacher.paths.folder``, the diffusers layout of the Hub repository): ``transformer/``
(config.json + diffusion_pytorch_model.safetensors, our ``meissonic_modules.Transformer2DModel``),
``vqvae/`` (diffusers ``VQModel``), and ``text_encoder/`` + ``tokenizer/`` (CLIP-H
``CLIPTextModelWithProjection``; upstream's inference.py swaps in laion/CLIP-ViT-H-14-laion2B, which a
user may copy into ``text_encoder/``). ``teacher.paths.text_features`` replaces the text encoder.

Conventions of this adapter:
- Condition: one tensor [B, T+1, C] = CLIP hidden_states[-2] [B, T, C] with text_embeds [B, C]
  appended as a last token row (``muse_common.pack_text``; C = P here, so nothing is padded); the
  null condition is the empty prompt "", which is also the CFG negative prompt (inference.py's long
  negative prompt is not used).
- Embedding helpers, VQ decoding, text sources, loading and the sampler (cosine schedule in double
  precision, Gumbel re-masking) are ``muse_common.MuseTeacher``'s; this module adds the timestep.
- Soft-embedding hook: ``embed.embeddings`` (before the RMSNorm); logits [B, V, 64, 64] → [B, L, V].
- Micro-conditions: (w, h, crop top, crop left, aesthetic) = (resolution, resolution, 0, 0, 6).
- Timestep: the model multiplies its ``timestep`` argument by 1000. Meissonic's training passes
  mask_prob·1000, its pipeline the step index N−1…0, and Di[M]O computes ``long(mask_prob)·1000``,
  which is 0 for every mask_prob < 1, so Di[M]O's teacher, auxiliary and one-step generator all ran
  at timestep 0. ``forward_embeddings`` has no mask ratio, so it uses one fixed value,
  ``teacher.options.timestep`` (default 0.0, Di[M]O's effective value; 500.0 would be mask_prob 0.5
  in the training semantics). ``sample`` follows the pipeline (step index).
- Features for the discriminator: the image stream [B, N, D] after each dual-stream block, then the
  image part of the joint stream after each single-stream block (depth = 14 + 28).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from softdimo.teachers import TeacherOptionError
from softdimo.teachers.meissonic_modules import MeissonicConfig, Transformer2DModel
from softdimo.teachers.muse_common import (MuseTeacher, check_options, component_files, load_diffusers,
                                           load_text_source, load_weights, number_option, vq_scale)

DEFAULT_OPTIONS = {
    "resolution": 1024,         # image side in pixels; the token grid is resolution / 16
    "timestep": 0.0,            # fixed ``timestep`` argument of forward_embeddings (see above)
    "aesthetic_score": 6.0,     # the fifth micro-condition (pipeline default)
}
# inference.py: 64 steps, CFG 9; scheduler: Gumbel temperature linspace(2 → 0), no softmax scaling
SAMPLING = {"steps": 64, "cfg": 9.0, "temperature": 1.0, "randomize": 2.0}
SOURCE = "MeissonFlow/Meissonic"


class MeissonicTeacher(MuseTeacher):
    """Teacher protocol for Meissonic: Transformer2DModel φ, diffusers VQModel, CLIP-H text."""

    family = "Meissonic"

    def __init__(self, backbone: Transformer2DModel, vqvae: nn.Module, text_encoder=None,
                 resolution: int = 1024, timestep: float = 0.0, aesthetic_score: float = 6.0):
        config = backbone.config
        scale = vq_scale(vqvae)
        grid = resolution // scale
        if resolution % scale or (config.downsample and grid % 2):
            raise TeacherOptionError("teacher.options.resolution", f"{resolution} px does not give "
                                     f"an even token grid with the VQ's {scale}× downsampling")
        super().__init__(backbone, vqvae, text_encoder, codebook_size=config.codebook_size,
                         mask_id=config.mask_id, grid=grid,
                         text_dims=(config.joint_attention_dim, config.pooled_projection_dim),
                         micro=(resolution, resolution, 0.0, 0.0, aesthetic_score))
        self.depth: int = backbone.depth
        self.hidden_width: int = config.inner_dim
        inner = backbone.internal_grid(grid, grid)
        self.feature_len: int = inner[0] * inner[1]
        self.image_size: int = resolution
        self.sampling: dict = dict(SAMPLING)
        self.timestep = float(timestep)

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ from e [B, L, D] -> (logits [B, L, V], features [B, N, D] per layer)."""
        return self._forward(net, e, cond, layers, self.timestep)

    def _forward(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor, layers: Sequence[int],
                 timestep: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = e.shape[0]
        hidden, pooled = self._unpack(cond.to(e.dtype))
        micro = self.micro_conds(b, e.device, e.dtype)
        t = torch.full((1,), timestep, device=e.device)
        logits, features = net.forward_from_embeddings(
            e.reshape(b, *self.grid_shape, e.shape[-1]), hidden, pooled, micro, t, layers)
        # channels-first [B, V, H, W] -> positions-last [B, L, V]
        return logits.flatten(2).transpose(1, 2), features

    def _sampling_logits(self, e: torch.Tensor, cond: torch.Tensor, step: int,
                         steps: int) -> torch.Tensor:
        """The pipeline's timestep argument at step i of N is the step index N−1−i."""
        return self._forward(self.backbone, e, cond, (), float(steps - 1 - step))[0]


# --------------------------------------------------------------------- loading
def load_transformer(folder: Path) -> Transformer2DModel:
    """``folder/transformer`` -> Transformer2DModel, weights loaded strictly."""
    config_path, weights = component_files(folder, "transformer", SOURCE)
    config = MeissonicConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
    return load_weights(Transformer2DModel(config), weights)


def load_vqvae(folder: Path) -> nn.Module:
    """``folder/vqvae`` -> diffusers VQModel built from its config, weights loaded strictly."""
    from diffusers import VQModel

    return load_diffusers(VQModel, folder, "vqvae", SOURCE)


def _options(options: dict) -> dict:
    out = check_options(options, DEFAULT_OPTIONS, "Meissonic")
    for name, kind in (("resolution", int), ("timestep", float), ("aesthetic_score", float)):
        out[name] = number_option(name, out[name], kind)
    return out


def load(paths: dict[str, Path], options: dict, device) -> MeissonicTeacher:
    """The Meissonic teacher from ``teacher.paths`` (folder, optional text_features), frozen on device."""
    opts = _options(options)
    folder = Path(paths["folder"])
    backbone = load_transformer(folder)
    vqvae = load_vqvae(folder)
    text = load_text_source(paths, folder, device)
    return MeissonicTeacher(backbone, vqvae, text, **opts).to(device)
