"""MaskBit (Weber et al. 2024, markweberdev/maskbit) behind the Teacher protocol.

The generator predicts, at each of N = 256 positions, M = 2 groups of 7 bits (C = 128 codes each).
softdimo flattens the groups into the token axis: L = N·M = 512 positions, index ``M·pos + group``,
V = C = 128 codes, [MASK] = 128. The generator has no embedding table; a group's input is its 7 bits
as ±1 (LSB first, all 0 when masked), so the "embedding" here is D = 7 bits and
E^T p = p @ S with S[k, j] = 2·((k >> j) & 1) − 1 is the expected bit vector (teachers.md §3.3).
``forward_embeddings`` concatenates a position's two groups into the 14 bits ``input_proj`` takes.
The tokenizer's 14 latent channels are the same bits (group 0 = bits 0..6), so the decoder takes the
expected bits as a [B, 14, 16, 16] latent.

Files (``teacher.paths``): generator/tokenizer ``.bin`` state dicts and their published yaml configs.
Option ``dropout`` overrides the yaml's generator dropout (0.1), which acts in students' train mode.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from softdimo.checkpoints import load_strict, read_tensors
from softdimo.teachers import TeacherOptionError
from softdimo.teachers.maskbit_modules import LFQBert, rename_generator_keys
from softdimo.teachers.maskbit_vqgan import ConvVQConfig, ConvVQModel

NUM_CLASSES = 1000          # upstream builds LFQBert with its default nclass; no yaml field sets it


def mask_ratio(progress: float, mode: str = "arccos") -> float:
    """Fraction of the tokens still masked after a step at ``progress`` in (0, 1], in [1e-6, 1]
    (``modeling/modules/masking.py:get_masking_ratio``)."""
    ratios = {"root": lambda r: 1 - r ** 0.5, "square": lambda r: 1 - r ** 2,
              "cosine": lambda r: math.cos(r * math.pi / 2), "linear": lambda r: 1 - r,
              "arccos": lambda r: math.acos(r) / (math.pi / 2)}
    if mode not in ratios:
        raise ValueError(f"unknown mask schedule {mode!r}; expected one of {', '.join(ratios)}")
    return min(max(ratios[mode](progress), 1e-6), 1.0)


def cfg_scale(step: int, steps: int, guidance: float, annealing: str = "cosine",
              power: float = 3.0) -> float:
    """CFG scale s at ``step`` (0-based) for logits c + s·(c − u) (``modeling/modules/sampling.py``):
    cosine = g·(1 − cos(π·(i/S)^power))/2, linear = g·i/S, none = g."""
    t = step / steps
    ramps = {"none": 1.0, "linear": t, "cosine": (1 - math.cos(math.pi * t ** power)) / 2}
    if annealing not in ramps:
        raise ValueError(f"unknown guidance annealing {annealing!r}; expected one of {', '.join(ramps)}")
    return guidance * ramps[annealing]


def _gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn on the generator's device, moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return (-torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))).to(device)


@torch.no_grad()
def maskbit_sample(logits_fn: Callable[[int, torch.Tensor], torch.Tensor], batch: int, seq_len: int,
                   mask_id: int, steps: int, generator: torch.Generator, temperature: float = 1.0,
                   randomize: float = 7.8, schedule: str = "arccos",
                   temperature_annealing: bool = False, device: torch.device | None = None
                   ) -> torch.Tensor:
    """MaskBit's sampler over all L group-tokens jointly -> tokens [B, L] (< V).

    logits_fn(step, ids [B, L]) -> logits [B, L, V] (CFG applied). Each step draws every masked
    token from softmax(logits / T), scores it by log p + randomize·(1 − progress)·Gumbel, and keeps
    masked the floor(ratio·L) least confident (at least 1, at most all-but-one still masked); the
    last step's draws are the result. Upstream picks by a confidence threshold; here exactly that
    many are kept, which differs only on exact ties, and with more steps than tokens upstream
    re-masks everything once one token is left (its clamp gives 0), here nothing is re-masked.
    All randomness comes from ``generator``.
    """
    device = torch.device(device) if device is not None else generator.device
    ids = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    masked = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    for i in range(steps):
        progress = (i + 1) / steps
        logits = logits_fn(i, ids).float()
        if temperature_annealing:           # upstream's use_sampling_annealing
            temperature = 0.5 + 0.8 * (1 - progress)
        logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
        if temperature > 0:                  # Gumbel-max = a Categorical draw, on the generator
            drawn = (logp + _gumbel(logp.shape, generator, device)).argmax(-1)
        else:
            drawn = logp.argmax(-1)
        drawn = torch.where(masked, drawn, ids)
        conf = logp.gather(-1, drawn[..., None]).squeeze(-1)
        conf = conf + randomize * (1 - progress) * _gumbel(conf.shape, generator, device)
        conf = conf.masked_fill(~masked, math.inf)      # decided tokens stay decided
        still = int(masked[0].sum())
        keep = min(max(math.floor(mask_ratio(progress, schedule) * seq_len), 1), still - 1)
        remask = torch.zeros_like(masked)
        if keep > 0:
            remask.scatter_(1, conf.argsort(dim=-1)[:, :keep], True)
        ids = torch.where(remask, mask_id, drawn)
        masked = remask
    return drawn


class MaskBitTeacher:
    """Teacher protocol over a frozen LFQBert (``backbone``) and ConvVQModel (``tokenizer``)."""

    conditioning = "class"

    def __init__(self, backbone: LFQBert, tokenizer: ConvVQModel, image_size: int,
                 sampler: dict[str, Any]):
        if tokenizer.config.token_size != backbone.bits:
            raise ValueError(f"the generator takes {backbone.bits} bits, the tokenizer makes "
                             f"{tokenizer.config.token_size}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.groups: int = backbone.splits                          # M
        self.group_bits: int = backbone.group_bits                  # D = bits per group
        self.V: int = backbone.group_size
        self.mask_id: int = backbone.mask_token
        self.seq_len: int = backbone.seq_len * self.groups          # L
        self.token_shape: tuple = (self.seq_len,)
        side = math.isqrt(backbone.seq_len)
        self.grid_shape: tuple = (side, side, self.groups)          # how the L tokens tile the image
        self.depth: int = backbone.depth
        self.hidden_width: int = backbone.hidden_dim
        self.feature_len: int = backbone.seq_len                    # one hidden state per position
        self.num_classes: int = backbone.nclass
        self.image_size: int = image_size
        self._sampler = dict(sampler)
        self.sampling: dict = {k: self._sampler[k] for k in ("steps", "cfg", "temperature", "randomize")}
        codes = torch.arange(self.V + 1)
        signs = ((codes[:, None] & (2 ** torch.arange(self.group_bits))) != 0).float() * 2 - 1
        signs[self.V] = 0.0                                          # [MASK]: all bits 0
        self._bits = signs.to(self.device)                           # [V + 1, D]

    @property
    def device(self) -> torch.device:
        return self.backbone.pos_emb.device

    def to(self, device: torch.device | str) -> "MaskBitTeacher":
        self.backbone.to(device)
        self.tokenizer.to(device)
        self._bits = self._bits.to(device)
        return self

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> bits [B, L, D] in {−1, 0, +1}."""
        return self._bits[ids]

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> expected bits p @ S [B, L, D] (Eq. 3 with S the ±1 code table)."""
        return p @ self._bits[:self.V].to(p.dtype)

    def mask_embedding(self) -> torch.Tensor:
        """[MASK]'s input, [D] zeros."""
        return self._bits[self.mask_id]

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """net (φ, θ or ψ, an LFQBert) from bits e [B, L, D] and class ids [B]
        -> (logits [B, L, V], hidden states [B, N, D_h] after each block in ``layers``)."""
        b = e.shape[0]
        logits, hidden = net.forward_bits(e.reshape(b, -1, self.groups * self.group_bits), cond, layers)
        return logits.reshape(b, self.seq_len, self.V), hidden

    def make_student(self) -> nn.Module:
        """A trainable copy of φ with ``input_proj`` (its input "embedding") frozen (Table 5)."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.input_proj.requires_grad_(False)
        return net

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Class ids [B] -> a new long tensor on the teacher's device (the caller's is never touched)."""
        if labels is None or prompts is not None:
            raise ValueError("MaskBit is class-conditioned: pass labels, not prompts")
        labels = torch.as_tensor(labels).to(device=self.device, dtype=torch.long).clone().view(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"MaskBit labels must lie in [0, {self.num_classes})")
        return labels

    def null_condition(self, batch: int) -> torch.Tensor:
        """The dropped label (class_emb row ``num_classes``), [B]."""
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.device)

    # ----------------------------------------------------------------- images
    def _decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """bits [B, L, D] -> images [B, 3, H, W] clamped to [0, 1] as upstream's evaluation does."""
        b, side = bits.shape[0], self.grid_shape[0]
        z = bits.reshape(b, side, side, self.groups * self.group_bits).permute(0, 3, 1, 2)
        return self.tokenizer.decode(z.contiguous()).clamp(0.0, 1.0)

    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] first."""
        return self._decode_bits(self._bits[ids.clamp(0, self.V - 1)])

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, L, V] -> images from the expected bits, differentiable in p."""
        return self._decode_bits(self.embed_probs(p))

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 7.8) -> torch.Tensor:
        """MaskBit's sampler -> tokens [B, L] (< V). ``cfg`` is MaskBit's guidance g: logits are
        c + s·(c − u) with s ramped from 0 (cosine^3 in the published config); g = 0 skips u."""
        b = cond.shape[0]
        both = torch.cat([cond, self.null_condition(b)])
        width = self.groups * self.group_bits

        def logits_fn(step: int, ids: torch.Tensor) -> torch.Tensor:
            if cfg == 0:
                return self.forward_embeddings(self.backbone, self.embed_ids(ids), cond)[0]
            bits = self.embed_ids(ids).reshape(b, -1, width)
            logits = self.backbone.forward_bits(torch.cat([bits, bits]), both)[0]
            c, u = logits.reshape(2 * b, self.seq_len, self.V).chunk(2)
            s = cfg_scale(step, steps, cfg, self._sampler["annealing"], self._sampler["scale_pow"])
            return c + s * (c - u)

        return maskbit_sample(logits_fn, b, self.seq_len, self.mask_id, steps, generator,
                              temperature=temperature, randomize=randomize,
                              schedule=self._sampler["schedule"],
                              temperature_annealing=self._sampler["temperature_annealing"],
                              device=self.device)


# --------------------------------------------------------------------- loading
def _field(config, key: str, source: Path) -> Any:
    """``config.<key>`` (dotted) or a ValueError naming the file and the key."""
    value = OmegaConf.select(config, key, default=None)
    if value is None:
        raise ValueError(f"{source}: missing {key}")
    return value


def _tokenizer_config(vq, source: Path) -> ConvVQConfig:
    """The network fields of ``model.vq_model`` (a MaskBit yaml)."""
    if vq.get("quantizer_type") != "lookup-free":
        raise ValueError(f"{source}: model.vq_model.quantizer_type must be 'lookup-free' for MaskBit, "
                         f"got {vq.get('quantizer_type')!r}")
    fields = ("token_size", "num_channels", "hidden_channels", "num_resolutions", "num_res_blocks",
              "sample_with_conv")
    values = {f: _field(vq, f, source) for f in fields}
    return ConvVQConfig(channel_mult=tuple(_field(vq, "channel_mult", source)),
                        num_res_blocks_decoder=vq.get("num_res_blocks_decoder"), **values)


def load(paths: dict[str, Path], options: dict, device) -> MaskBitTeacher:
    """The MaskBit teacher from its two ``.bin`` state dicts and two yaml configs, loaded strictly."""
    unknown = set(options) - {"dropout"}
    if unknown:
        raise TeacherOptionError(f"teacher.options.{sorted(unknown)[0]}",
                                 "unknown option for maskbit (it takes: dropout)")
    gen_yaml, tok_yaml = paths["generator_config"], paths["tokenizer_config"]
    gen_cfg, tok_cfg = OmegaConf.load(gen_yaml), OmegaConf.load(tok_yaml)
    tok_config = _tokenizer_config(_field(tok_cfg, "model.vq_model", tok_yaml), tok_yaml)
    mlm = _field(gen_cfg, "model.mlm_model", gen_yaml)
    if mlm.get("model_cls") != "lfq_bert":
        raise ValueError(f"{gen_yaml}: model.mlm_model.model_cls must be 'lfq_bert', "
                         f"got {mlm.get('model_cls')!r}")
    bits = _field(gen_cfg, "model.vq_model.token_size", gen_yaml)
    levels = _field(gen_cfg, "model.vq_model.num_resolutions", gen_yaml)
    if (bits, levels) != (tok_config.token_size, tok_config.num_resolutions):
        raise ValueError(f"{gen_yaml} expects {bits}-bit tokens from {levels} resolutions, "
                         f"{tok_yaml} has {tok_config.token_size} bits and "
                         f"{tok_config.num_resolutions} resolutions")
    dropout = options.get("dropout", _field(mlm, "dropout", gen_yaml))
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise TeacherOptionError("teacher.options.dropout", f"must be a number in [0, 1), got {dropout!r}")

    # as upstream's eval script: 2^token_size codes (the yaml's codebook_size is not used for LFQ)
    backbone = LFQBert(
        img_size=_field(gen_cfg, "dataset.preprocessing.resolution", gen_yaml),
        hidden_dim=_field(mlm, "hidden_dim", gen_yaml), codebook_size=2 ** bits,
        codebook_splits=_field(mlm, "codebook_splits", gen_yaml), depth=_field(mlm, "depth", gen_yaml),
        heads=_field(mlm, "heads", gen_yaml), mlp_dim=_field(mlm, "mlp_dim", gen_yaml),
        dropout=float(dropout), nclass=NUM_CLASSES,
        input_stride=2 ** (levels - 1),
        use_prenorm=bool(mlm.get("use_prenorm", False)))
    load_strict(backbone, rename_generator_keys(read_tensors(paths["generator"])), str(paths["generator"]))
    tokenizer = ConvVQModel(tok_config)
    load_strict(tokenizer, read_tensors(paths["tokenizer"]), str(paths["tokenizer"]))

    sampler = {"steps": int(_field(mlm, "num_steps", gen_yaml)),
               "cfg": float(_field(mlm, "guidance_scale", gen_yaml)),
               "temperature": float(_field(mlm, "softmax_temperature", gen_yaml)),
               "randomize": float(_field(mlm, "randomize_temperature", gen_yaml)),
               "schedule": str(_field(mlm, "gen_mask_schedule_strategy", gen_yaml)),
               "annealing": str(_field(mlm, "guidance_annealing", gen_yaml)),
               "scale_pow": float(_field(mlm, "scale_pow", gen_yaml)),
               "temperature_annealing": bool(mlm.get("use_sampling_annealing", False))}
    mask_ratio(0.5, sampler["schedule"])                       # unknown names fail here, not mid-run
    cfg_scale(1, 2, 1.0, sampler["annealing"], sampler["scale_pow"])
    image_size = math.isqrt(backbone.seq_len) * 2 ** (tok_config.num_resolutions - 1)
    return MaskBitTeacher(backbone, tokenizer, image_size, sampler).to(device)
