"""What the MUSE-family teachers (aMUSEd, Meissonic) share: one diffusers layout, one sampler.

Both are UVit-style masked-token transformers from the diffusers family: the token table
``embed.embeddings`` sits before an RMSNorm (the soft-embedding hook, teachers.md §1), a diffusers
``VQModel`` decodes the 8192 codes, CLIP-with-projection text conditions the model, micro-conditions
(width, height, crop top, crop left, aesthetic score) enter through sinusoids, and sampling is the
MUSE/aMUSEd scheduler. Each adapter subclasses ``MuseTeacher`` and adds only its own forward
(``forward_embeddings``), its constructor checks and its schedule rounding.

Shapes: B batch, L = h·w token positions (row-major over the h×w latent grid), V codebook size,
D token-table width, T text tokens (77), C text hidden width, P pooled text width, C_vq codebook
vector width, H×W image pixels.

A condition is ONE tensor [B, T+1, max(C, P)] (``pack_text``): rows 0..T−1 hold the CLIP
penultimate hidden states (``hidden_states[-2]``), row T the projected ``text_embeds``, each
zero-padded to the common width, so that CFG can ``torch.cat`` a conditional and a null batch.
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

# the two names diffusers' save_pretrained writes (the fp16 variant on the Hub for aMUSEd)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def pack_text(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, C] and pooled [B, P] -> one condition [B, T+1, max(C, P)] (zero-padded)."""
    width = max(hidden.shape[-1], pooled.shape[-1])
    out = hidden.new_zeros(hidden.shape[0], hidden.shape[1] + 1, width)
    out[:, :-1, :hidden.shape[-1]] = hidden
    out[:, -1, :pooled.shape[-1]] = pooled
    return out


def vq_scale(vqvae: nn.Module) -> int:
    """Pixels per token side: VQModel halves the resolution once per block after the first."""
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------- network pieces
def embed_rows(embed: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """Token-table rows e [B, h, w, D] -> ``embed``'s output [B, C_b, h, w] (RMSNorm, 1×1 conv).

    The part of diffusers' ``UVit2DConvEmbed.forward`` after the table lookup, so soft rows
    (E^T p) go where looked-up ids would.
    """
    return embed.conv(embed.layer_norm(e).permute(0, 3, 1, 2))


def pooled_with_micro_conds(cond_embed: nn.Module, pooled: torch.Tensor, micro: torch.Tensor,
                            encode_dim: int) -> torch.Tensor:
    """pooled text [B, P] and micro-conditions [B, 5] -> ``cond_embed``'s output [B, D_h].

    Each micro-condition becomes a sinusoid of width ``encode_dim`` (cos first, as UVit2DModel).
    """
    from diffusers.models.embeddings import get_timestep_embedding

    sines = get_timestep_embedding(micro.flatten(), encode_dim, flip_sin_to_cos=True,
                                   downscale_freq_shift=0).reshape(micro.shape[0], -1)
    dtype = cond_embed.linear_1.weight.dtype
    return cond_embed(torch.cat([pooled, sines], dim=1).to(dtype))


# ---------------------------------------------------------------------- the teacher
class MuseTeacher:
    """Teacher protocol pieces common to aMUSEd and Meissonic.

    A subclass sets ``family`` (the name in messages) and, after ``__init__``, ``depth``,
    ``hidden_width``, ``feature_len``, ``image_size`` and ``sampling``; it implements
    ``forward_embeddings`` and may override ``_sampling_logits`` (the network call inside the
    sampler) and ``mask_count`` (the cosine schedule's rounding).
    """

    conditioning = "text"
    num_classes = 0
    family = "MUSE"

    def __init__(self, backbone: nn.Module, vqvae: nn.Module, text_encoder, *, codebook_size: int,
                 mask_id: int, grid: int, text_dims: tuple[int, int], micro: Sequence[float]):
        if vqvae.config.num_vq_embeddings != codebook_size:
            raise ValueError(f"the transformer predicts {codebook_size} codes, the VQ codebook has "
                             f"{vqvae.config.num_vq_embeddings}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.V: int = int(codebook_size)
        self.mask_id: int = int(mask_id)
        self.grid_shape: tuple = (grid, grid)          # how the L tokens tile the image (row-major)
        self.seq_len: int = grid * grid
        self.token_shape: tuple = (self.seq_len,)
        self._text_dims = text_dims                    # (C, P) of the packed condition
        self._micro = tuple(float(m) for m in micro)   # the five micro-conditions, fixed
        self._null_text: torch.Tensor | None = None    # packed features of "" [1, T+1, ...]

    @property
    def device(self) -> torch.device:
        return self.backbone.embed.embeddings.weight.device

    def to(self, device: torch.device | str) -> "MuseTeacher":
        """Move the networks and the cached null condition to ``device``."""
        self.backbone.to(device)
        self.vqvae.to(device)
        if self._null_text is not None:
            self._null_text = self._null_text.to(device)
        return self

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> the token-table rows [B, L, D] (before the RMSNorm)."""
        return self.backbone.embed.embeddings(ids)

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> E^T p [B, L, D] over the V code rows (Eq. 3; mask and spare rows excluded)."""
        table = self.backbone.embed.embeddings.weight
        return p.to(table.dtype) @ table[:self.V]

    def mask_embedding(self) -> torch.Tensor:
        """The [MASK] row of the token table, [D]."""
        return self.backbone.embed.embeddings.weight[self.mask_id]

    def make_student(self) -> nn.Module:
        """A trainable copy of φ (θ or ψ) with its token table frozen (Table 5, "Fix Embedding Layer")."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.embed.embeddings.requires_grad_(False)
        return net

    def micro_conds(self, batch: int, device, dtype) -> torch.Tensor:
        """[B, 5]: width, height, crop top, crop left, aesthetic score (the pipelines' order)."""
        return torch.tensor(self._micro, device=device, dtype=dtype).expand(batch, -1)

    # ----------------------------------------------------------------- conditions
    def _unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T+1, max(C, P)] -> (hidden [B, T, C], pooled [B, P]); a wrong shape is a ValueError."""
        c, p = self._text_dims
        if cond.dim() != 3 or cond.shape[-1] != max(c, p) or cond.shape[1] < 2:
            raise ValueError(f"{self.family} condition must be [B, T+1, {max(c, p)}] (from "
                             f"encode_condition), got {tuple(cond.shape)}")
        return cond[:, :-1, :c], cond[:, -1, :p]

    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """B prompts -> [B, T+1, max(C, P)] (see the module docstring); no labels."""
        if prompts is None or labels is not None:
            raise ValueError(f"{self.family} is text-conditioned: pass prompts=, not labels=")
        if self.text_encoder is None:
            raise ValueError(f"{self.family} has no text source: put text_encoder/ and tokenizer/ in "
                             "teacher.paths.folder, or set teacher.paths.text_features")
        with torch.no_grad():
            out = self.text_encoder(list(prompts))
        # ClipTextEncoder gives (hidden, pooled); a PrecomputedText file already holds packed rows
        cond = pack_text(*out) if isinstance(out, tuple) else out
        self._unpack(cond)
        return cond.to(device=self.device, dtype=torch.float32)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The empty prompt's condition (the pipelines' CFG negative), [B, T+1, max(C, P)]."""
        if self._null_text is None:
            self._null_text = self.encode_condition(prompts=[""])
        return self._null_text.expand(batch, -1, -1).clone()

    # ----------------------------------------------------------------- images
    def _decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, C_vq, h, w] -> images [B, 3, H, W] clipped to [0, 1] like the pipelines."""
        vq = self.vqvae
        spatial = zq if vq.config.norm_type == "spatial" else None
        return vq.decoder(vq.post_quant_conv(zq), spatial).clamp(0, 1)

    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] first."""
        quantize = self.vqvae.quantize
        shape = (ids.shape[0], *self.grid_shape, quantize.embedding.weight.shape[1])
        return self._decode_latents(quantize.get_codebook_entry(ids.clamp(0, self.V - 1).reshape(-1), shape))

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1] through p @ codebook, differentiable."""
        book = self.vqvae.quantize.embedding.weight                       # [V, C_vq]
        zq = (p.to(book.dtype) @ book).reshape(p.shape[0], *self.grid_shape, -1)
        # contiguous like get_codebook_entry's output, so one-hot p takes the hard path's kernels
        return self._decode_latents(zq.permute(0, 3, 1, 2).contiguous())

    # ----------------------------------------------------------------- sampling
    def _sampling_logits(self, e: torch.Tensor, cond: torch.Tensor, step: int,
                         steps: int) -> torch.Tensor:
        """The network call at sampler step ``step`` of ``steps``: e [B, L, D] -> logits [B, L, V]."""
        return self.forward_embeddings(self.backbone, e, cond)[0]

    def guided_logits(self, ids: torch.Tensor, cond: torch.Tensor, cfg: float,
                      null: torch.Tensor | None, step: int, steps: int) -> torch.Tensor:
        """u + cfg·(c − u) [B, L, V] from one pass on [cond; null]; c alone when null is None."""
        e = self.embed_ids(ids)
        if null is None:
            return self._sampling_logits(e, cond, step, steps)
        both = self._sampling_logits(torch.cat([e, e]), torch.cat([cond, null]), step, steps)
        c, u = both.chunk(2)
        return u + cfg * (c - u)

    def mask_count(self, step: int, steps: int, length: int) -> int:
        """How many of ``length`` tokens stay masked after ``step``: ⌊L·cos(π/2·(step+1)/N)⌋."""
        return math.floor(length * math.cos(math.pi / 2 * (step + 1) / steps))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 2.0) -> torch.Tensor:
        """The MUSE scheduler -> tokens [B, L] (< V), all randomness from ``generator``.

        Start all-[MASK]. At step i of N every masked position draws a code from softmax(logits /
        temperature) (multinomial; temperature ≤ 0: argmax), logits being CFG-guided. Unless it is
        the last step, the ``mask_count`` least confident drawn positions are masked again, the
        confidence being log p(drawn) + τ_i·Gumbel with τ = linspace(randomize → 0) (the
        pipelines' Gumbel temperature (2, 0)); committed positions stay.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        b, device = cond.shape[0], self.device
        cond = cond.to(device)
        null = self.null_condition(b).to(cond.dtype) if cfg != 1.0 else None
        # float32 linspace as the schedulers build it, then one Python float per step
        taus = torch.linspace(float(randomize), 0.0, steps).tolist()
        greedy = temperature <= 0
        ids = torch.full((b, self.seq_len), self.mask_id, dtype=torch.long, device=device)
        for i in range(steps):
            logits = self.guided_logits(ids, cond, cfg, null, i, steps).float()
            ids = self._unmask_step(ids, logits if greedy else logits / temperature, i, steps, taus[i],
                                    generator, greedy)
        return ids

    def _unmask_step(self, ids: torch.Tensor, logits: torch.Tensor, i: int, steps: int,
                     gumbel_temp: float, generator: torch.Generator, greedy: bool = False) -> torch.Tensor:
        """One scheduler step (``AmusedScheduler.step``, Meissonic's ``Scheduler.step``): ids [B, L]
        and temperature-scaled logits [B, L, V] -> ids [B, L]."""
        b, length = ids.shape
        unknown = ids == self.mask_id
        probs = logits.float().softmax(dim=-1)
        if greedy:
            drawn = probs.argmax(-1)
        else:
            # random draws on the generator's device, so a CPU generator drives a GPU run too
            flat = probs.reshape(-1, self.V).to(generator.device)
            drawn = torch.multinomial(flat, 1, generator=generator).to(ids.device).view(b, length)
        drawn = torch.where(unknown, drawn, ids)
        if i == steps - 1:
            return drawn
        count = torch.full((b, 1), self.mask_count(i, steps, length), device=ids.device)
        # at least one re-masked, and fewer than were masked (so every step commits a token)
        count = torch.minimum(unknown.sum(dim=-1, keepdim=True) - 1, count).clamp(min=1)
        picked = probs.gather(-1, drawn[..., None])[..., 0]
        picked = torch.where(unknown, picked, torch.finfo(picked.dtype).max)   # keep committed
        noise = torch.rand(picked.shape, generator=generator, device=generator.device).to(ids.device)
        gumbel = -torch.log((-torch.log(noise.clamp(1e-20))).clamp(1e-20))
        confidence = torch.log(picked.clamp(1e-20)) + gumbel_temp * gumbel
        cutoff = confidence.sort(dim=-1).values.gather(1, count.long())
        return torch.where(confidence < cutoff, self.mask_id, drawn)


# ---------------------------------------------------------------------- loading
def component_files(folder: Path, component: str, source: str) -> tuple[Path, Path]:
    """``folder/component``'s config.json and weights, or TeacherFilesMissing naming the key."""
    sub = folder / component
    weights = next((sub / n for n in WEIGHT_FILES if (sub / n).is_file()), None)
    if not (sub / "config.json").is_file() or weights is None:
        raise TeacherFilesMissing("teacher.paths.folder", f"{sub} needs config.json and "
                                  f"{WEIGHT_FILES[0]} (the {component}/ of {source})")
    return sub / "config.json", weights


def load_weights(module: nn.Module, weights: Path) -> nn.Module:
    """``module`` with ``weights`` loaded strictly; the fp16 variant is upcast (teachers run in float32)."""
    load_strict(module, {k: v.float() for k, v in read_tensors(weights).items()}, str(weights))
    return module


def load_diffusers(cls, folder: Path, component: str, source: str) -> nn.Module:
    """A diffusers model built from ``folder/component/config.json``, its weights loaded strictly."""
    config, weights = component_files(folder, component, source)
    return load_weights(cls.from_config(json.loads(config.read_text())), weights)


def load_text_source(paths: dict, folder: Path, device):
    """prompts -> conditions: ``teacher.paths.text_features`` when given (CLIP is then not loaded),
    else the folder's text_encoder/ + tokenizer/ when both exist, else None."""
    if paths.get("text_features"):
        from softdimo.teachers.text_features import PrecomputedText

        return PrecomputedText(paths["text_features"], device)
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        from softdimo.teachers.clip_text import ClipTextEncoder

        return ClipTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", device)
    return None


def check_options(options: dict, defaults: dict, family: str) -> dict:
    """``defaults`` updated by ``options``; an unknown name is a TeacherOptionError naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TeacherOptionError(f"teacher.options.{unknown[0]}", f"unknown {family} option; "
                                 f"expected one of {', '.join(defaults)}")
    return {**defaults, **options}


def number_option(name: str, value, kind: type = float):
    """``value`` as ``kind``: float takes any number, int a positive whole one (bools are neither)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and (value != int(value) or value <= 0)):
        raise TeacherOptionError(f"teacher.options.{name}", f"{value!r} is not a valid "
                                 f"{'positive integer' if kind is int else 'number'}")
    return kind(value)
