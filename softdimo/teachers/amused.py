"""aMUSEd (amused/amused-256, amused/amused-512) behind the Teacher protocol (teachers.md §6).

The networks are diffusers' own ``UVit2DModel`` (the MDM φ) and ``VQModel`` (the tokenizer), each
built from its ``config.json`` and loaded strictly from ``diffusion_pytorch_model.safetensors``; the
deprecated ``AmusedPipeline`` is not used. Shapes: B batch, L = h·w token positions (row-major over
the h×w latent grid), V codebook size (8192), D embedding width (``in_channels``, 768), T text
tokens (77), C text width (768), P pooled text width (768).

Soft embeddings enter at ``embed.embeddings`` (the token table, before the RMSNorm), so one-hot
probabilities reproduce the hard path exactly (teachers.md §1, §9.7). The 512 variant downsamples
the h×w grid by 2 before its transformer layers, so ``feature_len`` is then L/4.

A condition is ONE tensor [B, T+1, max(C, P)]: rows 0..T−1 hold the CLIP penultimate hidden states
(``hidden_states[-2]``), row T the projected ``text_embeds``, zero-padded to the common width, so
that CFG can ``torch.cat`` a conditional and a null batch. The five micro-conditions (width,
height, crop top, crop left, aesthetic score 6) are constants of the adapter, as in the pipeline.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from softdimo.checkpoints import load_strict, read_tensors

# AmusedPipeline.__call__ defaults: 12 steps, guidance 10, Gumbel temperature (2, 0), no softmax
# temperature on the token draw
SAMPLING = {"steps": 12, "cfg": 10.0, "temperature": 1.0, "randomize": 2.0}
OPTIONS = {"aesthetic_score": 6.0, "crop_coord": (0, 0)}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")

TextEncoder = Callable[[list[str]], object]


def pack_text(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, C] and pooled [B, P] -> one condition [B, T+1, max(C, P)] (zero-padded)."""
    width = max(hidden.shape[-1], pooled.shape[-1])
    out = hidden.new_zeros(hidden.shape[0], hidden.shape[1] + 1, width)
    out[:, :-1, :hidden.shape[-1]] = hidden
    out[:, -1, :pooled.shape[-1]] = pooled
    return out


class AmusedTeacher:
    """Teacher protocol over a frozen UVit2DModel φ, its VQModel and a CLIP text source."""

    conditioning = "text"
    num_classes = 0

    def __init__(self, transformer: nn.Module, vqvae: nn.Module, mask_id: int,
                 text_encoder: TextEncoder | None = None, aesthetic_score: float = 6.0,
                 crop_coord: Sequence[int] = (0, 0)):
        tc, vc = transformer.config, vqvae.config
        if tc.codebook_size != vc.num_vq_embeddings:
            raise ValueError(f"transformer predicts {tc.codebook_size} codes, "
                             f"the VQ codebook has {vc.num_vq_embeddings}")
        if not tc.codebook_size <= mask_id < tc.vocab_size:
            raise ValueError(f"mask id {mask_id} must be a non-code row of the {tc.vocab_size}-row "
                             f"token table (codes are 0..{tc.codebook_size - 1})")
        if tc.micro_cond_embed_dim != 5 * tc.micro_cond_encode_dim:
            raise ValueError("micro_cond_embed_dim must be 5 × micro_cond_encode_dim (5 micro-conds)")
        self.backbone = transformer.eval().requires_grad_(False)
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.V: int = tc.codebook_size
        self.mask_id: int = int(mask_id)
        side = int(tc.sample_size)                              # latent grid side h = w
        self.grid_shape: tuple = (side, side)
        self.seq_len: int = side * side
        self.token_shape: tuple = (self.seq_len,)
        self.depth: int = tc.num_hidden_layers
        self.hidden_width: int = tc.hidden_size
        inner = side // 2 if tc.downsample else side            # Downsample2D: kernel 2, stride 2
        self.feature_len: int = inner * inner
        # VQModel halves the resolution once per block after the first (AmusedPipeline's vae_scale_factor)
        self.image_size: int = side * 2 ** (len(vc.block_out_channels) - 1)
        self.sampling: dict = dict(SAMPLING)
        self._text_dims = (tc.encoder_hidden_size, tc.cond_embed_dim)
        self._micro = (float(self.image_size), float(self.image_size), float(crop_coord[0]),
                       float(crop_coord[1]), float(aesthetic_score))
        self._null_text: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.backbone.embed.embeddings.weight.device

    def to(self, device: torch.device | str) -> "AmusedTeacher":
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
        """A trainable copy of φ with its token table frozen (Table 5, "Fix Embedding Layer")."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.embed.embeddings.requires_grad_(False)
        return net

    def _unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T+1, max(C, P)] -> (hidden [B, T, C], pooled [B, P])."""
        c, p = self._text_dims
        if cond.dim() != 3 or cond.shape[-1] != max(c, p) or cond.shape[1] < 2:
            raise ValueError(f"aMUSEd condition must be [B, T+1, {max(c, p)}] (from encode_condition), "
                             f"got {tuple(cond.shape)}")
        return cond[:, :-1, :c], cond[:, -1, :p]

    def micro_conds(self, batch: int, device, dtype) -> torch.Tensor:
        """[B, 5]: width, height, crop top, crop left, aesthetic score (the pipeline's order)."""
        return torch.tensor(self._micro, device=device, dtype=dtype).expand(batch, -1)

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ (a UVit2DModel) from token-table rows e [B, L, D].

        Follows ``UVit2DModel.forward`` submodule by submodule, starting after the table lookup, so
        that a deep copy behaves the same. Returns logits [B, L, V] and the hidden states
        [B, feature_len, hidden_width] after each transformer layer in ``layers``.
        """
        from diffusers.models.embeddings import get_timestep_embedding

        if any(not -self.depth <= i < self.depth for i in layers):
            raise IndexError(f"layers {tuple(layers)} out of range for {self.depth} transformer layers")
        wanted = {i % self.depth for i in layers}
        b = e.shape[0]
        h, w = self.grid_shape
        text, pooled = self._unpack(cond)
        text = net.encoder_proj_layer_norm(net.encoder_proj(text))
        micro = self.micro_conds(b, text.device, text.dtype)
        micro = get_timestep_embedding(micro.flatten(), net.config.micro_cond_encode_dim,
                                       flip_sin_to_cos=True, downscale_freq_shift=0).reshape(b, -1)
        dtype = net.cond_embed.linear_1.weight.dtype
        pooled = net.cond_embed(torch.cat([pooled, micro], dim=1).to(dtype)).to(text.dtype)
        kwargs = dict(pooled_text_emb=pooled, encoder_hidden_states=text, cross_attention_kwargs=None)

        x = net.embed.layer_norm(e.reshape(b, h, w, -1)).permute(0, 3, 1, 2)
        x = net.down_block(net.embed.conv(x), **kwargs)                   # [B, c, h', w']
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

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """B prompts -> [B, T+1, max(C, P)] (see the module docstring); aMUSEd takes no labels."""
        if prompts is None or labels is not None:
            raise ValueError("aMUSEd is text-conditioned: pass prompts=, not labels=")
        if self.text_encoder is None:
            raise ValueError("aMUSEd has no text source: put text_encoder/ and tokenizer/ in "
                             "teacher.paths.folder, or set teacher.paths.text_features")
        out = self.text_encoder(list(prompts))
        # ClipTextEncoder gives (hidden, pooled); a PrecomputedText file already holds packed rows
        cond = pack_text(*out) if isinstance(out, tuple) else out
        self._unpack(cond)
        return cond.to(device=self.device, dtype=torch.float32)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The empty prompt's condition (the pipeline's default negative prompt), [B, T+1, ...]."""
        if self._null_text is None:
            self._null_text = self.encode_condition(prompts=[""])
        return self._null_text.expand(batch, -1, -1).clone()

    # ----------------------------------------------------------------- images
    def _decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, C_vq, h, w] -> images [B, 3, H, W] clipped to [0, 1] like the pipeline."""
        vq = self.vqvae
        spatial = zq if vq.config.norm_type == "spatial" else None
        return vq.decoder(vq.post_quant_conv(zq), spatial).clamp(0, 1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] first."""
        quantize = self.vqvae.quantize
        shape = (ids.shape[0], *self.grid_shape, quantize.embedding.weight.shape[1])
        return self._decode_latents(quantize.get_codebook_entry(ids.clamp(0, self.V - 1).reshape(-1), shape))

    def decode_probs(self, p: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1] through p @ codebook, differentiable."""
        book = self.vqvae.quantize.embedding.weight                       # [V, C_vq]
        zq = (p.to(book.dtype) @ book).reshape(p.shape[0], *self.grid_shape, -1)
        return self._decode_latents(zq.permute(0, 3, 1, 2).contiguous())

    # ----------------------------------------------------------------- sampling
    def _logits(self, ids: torch.Tensor, cond: torch.Tensor, cfg: float,
                null: torch.Tensor | None) -> torch.Tensor:
        """Guided logits u + cfg·(c − u) [B, L, V] from one pass on [cond; null] (cfg = 1: c alone)."""
        e = self.embed_ids(ids)
        if null is None:
            return self.forward_embeddings(self.backbone, e, cond)[0]
        both = self.forward_embeddings(self.backbone, torch.cat([e, e]), torch.cat([cond, null]))[0]
        c, u = both.chunk(2)
        return u + cfg * (c - u)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 2.0) -> torch.Tensor:
        """AmusedScheduler sampling -> tokens [B, L] (< V), all randomness from ``generator``.

        Start all-[MASK]. At step i of N every masked position draws a code from softmax(logits /
        temperature) (multinomial; temperature ≤ 0: argmax). Unless it is the last step, the
        ⌊L·cos(π/2·(i+1)/N)⌋ least confident drawn positions are masked again (at least one, fewer
        than were masked), confidence being log p(drawn) + τ_i·Gumbel with τ_i linear from
        ``randomize`` to 0 (the pipeline's temperature=(2, 0)); committed positions stay. The
        draws and the float32 schedule arithmetic follow ``AmusedScheduler.step`` call for call,
        so a seeded generator gives the scheduler's own tokens.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        b, length = cond.shape[0], self.seq_len
        device = self.device
        cond = cond.to(device)
        null = self.null_condition(b).to(cond.dtype) if cfg != 1.0 else None
        taus = torch.linspace(float(randomize), 0.0, steps)
        ids = torch.full((b, length), self.mask_id, dtype=torch.long, device=device)
        for i in range(steps):
            logits = self._logits(ids, cond, cfg, null).float()
            unknown = ids == self.mask_id
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                flat = probs.reshape(-1, self.V).to(generator.device)
                drawn = torch.multinomial(flat, 1, generator=generator).to(device).view(b, length)
            else:
                probs = torch.softmax(logits, dim=-1)
                drawn = probs.argmax(-1)
            drawn = torch.where(unknown, drawn, ids)
            if i == steps - 1:
                return drawn
            # float32 as in the scheduler: e.g. cos(π/3) rounds below 1/2 there, which moves ⌊·⌋
            ratio = torch.cos((torch.tensor([[i + 1]]) / steps) * math.pi / 2)
            count = (length * ratio).floor().to(device)
            count = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1, count), min=1)
            picked = probs.gather(-1, drawn[..., None])[..., 0]
            picked = torch.where(unknown, picked, torch.finfo(picked.dtype).max)   # keep committed
            u = torch.rand(picked.shape, generator=generator, device=generator.device).to(device)
            gumbel = -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))
            confidence = torch.log(picked.clamp(1e-20)) + taus[i].to(device) * gumbel
            cutoff = confidence.sort(dim=-1).values.gather(1, count.long())
            ids = torch.where(confidence < cutoff, self.mask_id, drawn)
        return ids


# ---------------------------------------------------------------------- loading
def _build(cls, folder: Path, what: str):
    """A diffusers model built from ``folder/config.json`` with the folder's weights loaded strictly."""
    from softdimo.teachers import TeacherFilesMissing

    config_file = folder / "config.json"
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise TeacherFilesMissing("teacher.paths.folder", f"{folder} needs config.json and "
                                  f"{WEIGHT_FILES[0]} (the {what} of an aMUSEd diffusers folder)")
    model = cls.from_config(json.loads(config_file.read_text()))
    # the fp16 variant is upcast: the teacher runs in float32
    load_strict(model, {k: v.float() for k, v in read_tensors(weights).items()}, str(weights))
    return model


def _mask_id(folder: Path, vocab_size: int) -> int:
    """The scheduler's mask_token_id (8255 for both published models), else the last table row."""
    config = folder / "scheduler" / "scheduler_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["mask_token_id"])
    return vocab_size - 1


def _options(options: dict) -> dict:
    from softdimo.teachers import TeacherOptionError

    out = dict(OPTIONS)
    for name, value in options.items():
        if name not in OPTIONS:
            raise TeacherOptionError(f"teacher.options.{name}", "unknown aMUSEd option; expected one "
                                     f"of {', '.join(OPTIONS)}")
        if name == "crop_coord" and (not isinstance(value, (list, tuple)) or len(value) != 2):
            raise TeacherOptionError("teacher.options.crop_coord", "must be [top, left]")
        out[name] = value
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
    transformer = _build(UVit2DModel, folder / "transformer", "transformer")
    vqvae = _build(VQModel, folder / "vqvae", "VQ tokenizer")
    if paths.get("text_features"):
        from softdimo.teachers.text_features import PrecomputedText

        text = PrecomputedText(paths["text_features"], device)
    elif (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        from softdimo.teachers.clip_text import ClipTextEncoder

        text = ClipTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", device)
    else:
        text = None
    teacher = AmusedTeacher(transformer, vqvae, _mask_id(folder, transformer.config.vocab_size), text,
                            aesthetic_score=float(opts["aesthetic_score"]), crop_coord=opts["crop_coord"])
    return teacher.to(device)
