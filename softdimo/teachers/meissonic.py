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
  appended as a last token row (``pack_text``); the null condition is the empty prompt "", which is
  also the CFG negative prompt (inference.py's long negative prompt is not used).
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

import copy
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from softdimo.checkpoints import load_strict, read_tensors
from softdimo.teachers import TeacherFilesMissing, TeacherOptionError
from softdimo.teachers.meissonic_modules import MeissonicConfig, Transformer2DModel

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
DEFAULT_OPTIONS = {
    "resolution": 1024,         # image side in pixels; the token grid is resolution / 16
    "timestep": 0.0,            # fixed ``timestep`` argument of forward_embeddings (see above)
    "aesthetic_score": 6.0,     # the fifth micro-condition (pipeline default)
}
# inference.py: 64 steps, CFG 9; scheduler: Gumbel temperature linspace(2 → 0), no softmax scaling
SAMPLING = {"steps": 64, "cfg": 9.0, "temperature": 1.0, "randomize": 2.0}


def pack_text(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """hidden_states[-2] [B, T, C] and text_embeds [B, C] -> one condition tensor [B, T+1, C]."""
    if hidden.shape[-1] != pooled.shape[-1]:
        raise ValueError(f"cannot pack text: hidden width {hidden.shape[-1]} != pooled width "
                         f"{pooled.shape[-1]}")
    return torch.cat([hidden, pooled[:, None]], dim=1)


def unpack_text(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1, C] -> (encoder_hidden_states [B, T, C], pooled_projections [B, C])."""
    return cond[:, :-1], cond[:, -1]


class MeissonicTeacher:
    """Teacher protocol for Meissonic: Transformer2DModel φ, diffusers VQModel, CLIP-H text."""

    conditioning = "text"
    num_classes = 0

    def __init__(self, backbone: Transformer2DModel, vqvae: nn.Module, text_encoder=None,
                 resolution: int = 1024, timestep: float = 0.0, aesthetic_score: float = 6.0):
        config = backbone.config
        scale = 2 ** (len(vqvae.config.block_out_channels) - 1)
        grid = resolution // scale
        if resolution % scale or (config.downsample and grid % 2):
            raise TeacherOptionError("teacher.options.resolution", f"{resolution} px does not give "
                                     f"an even token grid with the VQ's {scale}× downsampling")
        if vqvae.config.num_vq_embeddings != config.codebook_size:
            raise ValueError(f"the transformer predicts {config.codebook_size} codes, the VQ has "
                             f"{vqvae.config.num_vq_embeddings}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.V: int = config.codebook_size
        self.mask_id: int = config.mask_id
        self.grid_shape: tuple = (grid, grid)          # how the L tokens tile the image (row-major)
        self.seq_len: int = grid * grid
        self.token_shape: tuple = (self.seq_len,)
        self.depth: int = backbone.depth
        self.hidden_width: int = config.inner_dim
        inner = backbone.internal_grid(grid, grid)
        self.feature_len: int = inner[0] * inner[1]
        self.image_size: int = resolution
        self.sampling: dict = dict(SAMPLING)
        self.timestep = float(timestep)
        self.micro_conds = torch.tensor([resolution, resolution, 0.0, 0.0, aesthetic_score])
        self._null_text: torch.Tensor | None = None    # packed features of "" [1, T+1, C]

    @property
    def device(self) -> torch.device:
        return self.backbone.embed.embeddings.weight.device

    def to(self, device) -> "MeissonicTeacher":
        self.backbone.to(device)
        self.vqvae.to(device)
        if self._null_text is not None:
            self._null_text = self._null_text.to(device)
        return self

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> ``embed.embeddings`` outputs [B, L, D]."""
        return self.backbone.embed.embeddings(ids)

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> E^T p [B, L, D] over the V code rows (padding and [MASK] rows excluded)."""
        return p @ self.backbone.embed.embeddings.weight[:self.V]

    def mask_embedding(self) -> torch.Tensor:
        """The [MASK] (id 8255) embedding, [D]."""
        return self.backbone.embed.embeddings.weight[self.mask_id]

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ from e [B, L, D] -> (logits [B, L, V], features [B, N, D] per layer)."""
        return self._forward(net, e, cond, layers, self.timestep)

    def _forward(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor, layers: Sequence[int],
                 timestep: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = e.shape[0]
        hidden, pooled = unpack_text(cond.to(e.dtype))
        micro = self.micro_conds.to(e).expand(b, -1)
        t = torch.full((1,), timestep, device=e.device)
        logits, features = net.forward_from_embeddings(
            e.reshape(b, *self.grid_shape, e.shape[-1]), hidden, pooled, micro, t, layers)
        # channels-first [B, V, H, W] -> positions-last [B, L, V]
        return logits.flatten(2).transpose(1, 2), features

    def make_student(self) -> nn.Module:
        """A trainable copy of φ (θ or ψ) with ``embed.embeddings`` frozen (Table 5)."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.embed.embeddings.requires_grad_(False)
        return net

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """B prompts -> packed CLIP-H features [B, T+1, C]."""
        if labels is not None or prompts is None:
            raise ValueError("Meissonic is text-conditioned: pass prompts, not labels")
        if self.text_encoder is None:
            raise ValueError("Meissonic has no text encoder: put text_encoder/ and tokenizer/ in "
                             "teacher.paths.folder, or set teacher.paths.text_features")
        with torch.no_grad():
            out = self.text_encoder(list(prompts))
        cond = pack_text(*out) if isinstance(out, tuple) else out
        width = self.backbone.config.joint_attention_dim
        if cond.ndim != 3 or cond.shape[-1] != width:
            raise ValueError(f"text features {tuple(cond.shape)} do not fit the transformer "
                             f"(expected [B, T+1, {width}])")
        return cond.to(device=self.device, dtype=torch.float32)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The empty prompt's packed features repeated, [B, T+1, C]."""
        if self._null_text is None:
            self._null_text = self.encode_condition(prompts=[""])
        return self._null_text.expand(batch, -1, -1).clone()

    # ----------------------------------------------------------------- images
    def _decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, C_vq, h, w] -> images [B, 3, H, W] clipped to [0, 1] (pipeline)."""
        vq = self.vqvae
        image = vq.decoder(vq.post_quant_conv(z), z if vq.config.norm_type == "spatial" else None)
        return image.clamp(0, 1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] first."""
        b = ids.shape[0]
        shape = (b, *self.grid_shape, self.vqvae.quantize.embedding.weight.shape[1])
        z = self.vqvae.quantize.get_codebook_entry(ids.clamp(0, self.V - 1).reshape(-1), shape)
        return self._decode_latent(z)

    def decode_probs(self, p: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1], differentiable in p."""
        z = p @ self.vqvae.quantize.embedding.weight                      # [B, L, C_vq]
        z = z.reshape(p.shape[0], *self.grid_shape, z.shape[-1]).permute(0, 3, 1, 2)
        return self._decode_latent(z)

    # ----------------------------------------------------------------- sampling
    def guided_logits(self, ids: torch.Tensor, cond: torch.Tensor, cfg: float,
                      null: torch.Tensor | None, timestep: float) -> torch.Tensor:
        """u + cfg·(c − u) [B, L, V] from one pass on the doubled batch; c alone when null is None."""
        e = self.embed_ids(ids)
        if null is None:
            return self._forward(self.backbone, e, cond, (), timestep)[0]
        b = ids.shape[0]
        both = self._forward(self.backbone, torch.cat([e, e]), torch.cat([cond, null]), (), timestep)[0]
        c, u = both[:b], both[b:]
        return u + cfg * (c - u)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 2.0) -> torch.Tensor:
        """Meissonic's scheduler -> tokens [B, L] (< V).

        Step i of N (timestep argument N−1−i, as the pipeline): sample every masked token from
        softmax(logits / temperature), then re-mask the floor(L·cos(π/2·(i+1)/N)) least confident
        (log p + Gumbel·τ_i, τ = linspace(randomize → 0)), at least one; the last step keeps all.
        """
        b, device = cond.shape[0], self.device
        cond = cond.to(device)
        null = self.null_condition(b) if cfg != 1.0 else None
        ids = torch.full((b, self.seq_len), self.mask_id, dtype=torch.long, device=device)
        gumbel_temps = torch.linspace(randomize, 0, steps).tolist()
        for i in range(steps):
            logits = self.guided_logits(ids, cond, cfg, null, timestep=float(steps - 1 - i))
            ids = self._unmask_step(ids, logits / temperature, i, steps, gumbel_temps[i], generator)
        return ids

    def _unmask_step(self, ids: torch.Tensor, logits: torch.Tensor, i: int, steps: int,
                     gumbel_temp: float, generator: torch.Generator) -> torch.Tensor:
        """One scheduler step (src/scheduler.py ``Scheduler.step``): ids [B, L] -> ids [B, L]."""
        b, length = ids.shape
        unknown = ids == self.mask_id
        probs = logits.float().softmax(dim=-1)
        # random draws on the generator's device, so a CPU generator drives a GPU run too
        drawn = torch.multinomial(probs.to(generator.device).reshape(-1, self.V), 1, generator=generator)
        pred = torch.where(unknown, drawn.view(b, length).to(ids.device), ids)
        if i == steps - 1:
            return pred
        mask_ratio = math.cos(math.pi / 2 * (i + 1) / steps)
        mask_len = torch.full((b, 1), math.floor(length * mask_ratio), device=ids.device)
        mask_len = torch.minimum(unknown.sum(dim=-1, keepdim=True) - 1, mask_len).clamp(min=1)
        chosen = probs.gather(-1, pred[..., None])[..., 0]
        chosen = torch.where(unknown, chosen, torch.finfo(chosen.dtype).max)
        noise = torch.rand(chosen.shape, generator=generator, device=generator.device).to(ids.device)
        gumbel = -torch.log((-torch.log(noise.clamp(1e-20))).clamp(1e-20))
        confidence = torch.log(chosen.clamp(1e-20)) + gumbel_temp * gumbel
        cut_off = confidence.sort(dim=-1).values.gather(1, mask_len.long())
        return torch.where(confidence < cut_off, self.mask_id, pred)


# --------------------------------------------------------------------- loading
def _component_files(folder: Path, component: str) -> tuple[Path, Path]:
    """``folder/component``'s config.json and weights, or TeacherFilesMissing naming the key."""
    sub = folder / component
    weights = next((sub / n for n in WEIGHT_NAMES if (sub / n).is_file()), None)
    if not (sub / "config.json").is_file() or weights is None:
        raise TeacherFilesMissing("teacher.paths.folder", f"{sub} needs config.json and "
                                  f"{WEIGHT_NAMES[0]} (MeissonFlow/Meissonic {component}/)")
    return sub / "config.json", weights


def load_transformer(folder: Path) -> Transformer2DModel:
    """``folder/transformer`` -> Transformer2DModel, weights loaded strictly."""
    config_path, weights = _component_files(folder, "transformer")
    config = MeissonicConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
    net = Transformer2DModel(config)
    load_strict(net, {k: v.float() for k, v in read_tensors(weights).items()}, str(weights))
    return net


def load_vqvae(folder: Path) -> nn.Module:
    """``folder/vqvae`` -> diffusers VQModel built from its config, weights loaded strictly."""
    from diffusers import VQModel

    config_path, weights = _component_files(folder, "vqvae")
    vq = VQModel.from_config(json.loads(config_path.read_text()))
    load_strict(vq, {k: v.float() for k, v in read_tensors(weights).items()}, str(weights))
    return vq


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TeacherOptionError(f"teacher.options.{unknown[0]}", f"unknown Meissonic option; "
                                 f"known: {', '.join(DEFAULT_OPTIONS)}")
    out = {**DEFAULT_OPTIONS, **options}
    for name, kind in (("resolution", int), ("timestep", float), ("aesthetic_score", float)):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and (value != int(value) or value <= 0)):
            raise TeacherOptionError(f"teacher.options.{name}", f"{value!r} is not a valid "
                                     f"{'positive integer' if kind is int else 'number'}")
        out[name] = kind(value)
    return out


def load(paths: dict[str, Path], options: dict, device) -> MeissonicTeacher:
    """The Meissonic teacher from ``teacher.paths`` (folder, optional text_features), frozen on device."""
    opts = _options(options)
    folder = Path(paths["folder"])
    backbone = load_transformer(folder)
    vqvae = load_vqvae(folder)
    text = None
    if paths.get("text_features"):
        from softdimo.teachers.text_features import PrecomputedText

        text = PrecomputedText(paths["text_features"], device)
    elif (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        from softdimo.teachers.clip_text import ClipTextEncoder

        text = ClipTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", device)
    return MeissonicTeacher(backbone, vqvae, text, **opts).to(device)
