"""MaskGen-VQ + TA-TiTok behind the Teacher protocol (teachers.md §4), from local HubMixin folders.

Shapes: B batch, L = 128 one-dimensional tokens, V = 8192 codes ([MASK] = V), D generator width
(1024 for MaskGen-L), T = 77 CLIP tokens, C = 768 CLIP width.

The condition tensor of one prompt packs every text input the two networks take, [B, 2T + 2, C]:
rows [0, T) the penultimate OpenCLIP ViT-L-14-336 token states (generator), rows [T, 2T) the final
``ln_final`` token states (TA-TiTok decoder's text guidance), row 2T the pooled projected text
embedding (generator), row 2T + 1 the aesthetic-score micro-condition in its first entry (zeros
elsewhere). With the OpenCLIP encoder, ``encode_condition`` writes the score from
``teacher.options.aesthetic_score`` (default: the generator config's ``sample_aesthetic_score``, else
the published 6.5). A precomputed text-features file stores exactly these rows and is used as stored
(its aesthetic row included).

Decoding needs text too. ``decode_ids(ids, cond)`` / ``decode_probs(p, cond)`` take the condition
explicitly (the protocol's optional argument; every trainer and evaluator call passes it); without it
they decode with the empty prompt's guidance (the null condition's), the unconditional decode.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from softdimo.checkpoints import StateDictMismatch, load_strict, read_tensors

from . import TeacherFilesMissing, TeacherOptionError
from .maskgen_modules import MaskGenConfig, MaskGenVQ
from .maskgen_tatitok import TATiTokConfig, TATiTokDecoderSide, split_encoder_keys

OPTIONS = {"aesthetic_score": "the aesthetic-score micro-condition written by encode_condition"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def mask_ratio(progress: float, mode: str = "arccos") -> float:
    """Share of tokens still masked after a fraction ``progress`` of the steps (get_masking_ratio)."""
    ratios = {"arccos": lambda r: math.acos(r) / (math.pi / 2),
              "cosine": lambda r: math.cos(r * math.pi / 2),
              "linear": lambda r: 1 - r, "square": lambda r: 1 - r ** 2, "root": lambda r: 1 - r ** 0.5}
    if mode not in ratios:
        raise ValueError(f"mask schedule {mode!r} is not one of {sorted(ratios)}")
    return ratios[mode](progress)


def _gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise −log(−log u), u ~ U[0, 1), both logs clamped at 1e-20 as upstream."""
    u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


class MaskGenTeacher:
    """Teacher protocol for MaskGen-VQ (generator φ) with the TA-TiTok VQ decoder."""

    conditioning = "text"
    num_classes = 0

    def __init__(self, backbone: MaskGenVQ, tokenizer: TATiTokDecoderSide,
                 text: Callable | None = None, aesthetic_score: float | None = None):
        g, t = backbone.config, tokenizer.config
        if (g.codebook_size, g.seq_len, g.text_embed_dim) != (t.codebook_size, t.num_latent_tokens,
                                                              t.text_embed_dim):
            raise ValueError(f"generator (codes {g.codebook_size}, tokens {g.seq_len}, text width "
                             f"{g.text_embed_dim}) does not fit the tokenizer (codes {t.codebook_size}, "
                             f"tokens {t.num_latent_tokens}, text width {t.text_embed_dim})")
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        # prompts -> (penultimate, final, pooled) (OpenClipText) or packed rows (PrecomputedText)
        self.text = text
        self.aesthetic_score = g.sample_aesthetic_score if aesthetic_score is None else aesthetic_score
        self.V: int = g.codebook_size
        self.mask_id: int = g.mask_id
        self.seq_len: int = g.seq_len
        self.token_shape: tuple = (g.seq_len,)
        self.depth: int = g.depth
        self.hidden_width: int = g.width
        self.feature_len: int = g.seq_len
        self.image_size: int = t.crop_size
        self.text_len: int = t.text_context_length
        self.text_dim: int = t.text_embed_dim
        self.mask_schedule: str = g.mask_schedule_strategy
        self.sampling: dict = {"steps": g.num_iter, "cfg": g.cfg, "temperature": 1.0,
                               "randomize": g.temperature}
        self._null: torch.Tensor | None = None          # packed condition of "" [1, 2T+2, C]

    @property
    def device(self) -> torch.device:
        return self.backbone.pos_embed.device

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> the ``embeddings`` output [B, L, D] (the hook point)."""
        return self.backbone.embeddings(ids)

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> E^T p [B, L, D] over the V code rows (Eq. 3)."""
        return p @ self.backbone.embeddings.weight[:self.V]

    def mask_embedding(self) -> torch.Tensor:
        """The [MASK] input embedding (row V), [D]."""
        return self.backbone.embeddings.weight[self.mask_id]

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ from e [B, L, D] -> (logits [B, L, V], hidden [B, L, D] per requested block)."""
        text, _, pooled, aesthetic = self.split_condition(cond)
        return net.forward_embeddings(e, text, pooled, aesthetic, layers)

    def make_student(self) -> nn.Module:
        """A trainable copy of φ with ``embeddings`` frozen (Table 5); the tied head stays tied to it."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.embeddings.requires_grad_(False)
        return net

    # ----------------------------------------------------------------- conditions
    def split_condition(self, cond: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed [B, 2T+2, C] -> (penultimate [B, T, C], final [B, T, C], pooled [B, C], aesthetic [B])."""
        t = self.text_len
        if cond.dim() != 3 or cond.shape[1:] != (2 * t + 2, self.text_dim):
            raise ValueError(f"a MaskGen condition is [B, {2 * t + 2}, {self.text_dim}] (see "
                             f"softdimo.teachers.maskgen), got {tuple(cond.shape)}")
        return cond[:, :t], cond[:, t:2 * t], cond[:, 2 * t], cond[:, 2 * t + 1, 0]

    def pack_condition(self, penultimate: torch.Tensor, final: torch.Tensor, pooled: torch.Tensor,
                       aesthetic: float) -> torch.Tensor:
        """The three text tensors of B prompts and one aesthetic score -> [B, 2T+2, C]."""
        micro = torch.zeros_like(pooled)
        micro[:, 0] = aesthetic
        return torch.cat([penultimate, final, pooled[:, None], micro[:, None]], dim=1)

    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """B prompts -> the packed condition [B, 2T+2, C] (float32, on the teacher's device)."""
        return self._encode(prompts, labels)

    def _encode(self, prompts: Sequence[str] | None, labels=None) -> torch.Tensor:
        if labels is not None or prompts is None:
            raise ValueError("MaskGen is text-conditioned: pass prompts, not labels")
        if self.text is None:
            raise ValueError("MaskGen needs text features for prompts: set teacher.paths.text_encoder "
                             "(open_clip ViT-L-14-336 weights) or teacher.paths.text_features")
        cond = self.text(list(prompts))
        if isinstance(cond, tuple):
            cond = self.pack_condition(*cond, self.aesthetic_score)
        cond = cond.to(device=self.device, dtype=torch.float32)
        self.split_condition(cond)                      # shape check against the decoder's T and C
        return cond

    def null_condition(self, batch: int) -> torch.Tensor:
        """The empty prompt's packed condition repeated, [B, 2T+2, C] (upstream's CFG negative)."""
        if self._null is None:
            self._null = self._encode([""])
        return self._null.to(self.device).expand(batch, -1, -1).clone()

    # ----------------------------------------------------------------- images
    def _guidance(self, batch: int, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is not None:
            return self.split_condition(cond.to(self.device))[1]
        return self.split_condition(self.null_condition(batch))[1]

    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [B, L] (clamped to [0, V−1]) -> images [B, 3, H, W] in [0, 1] (text guidance: see top)."""
        guidance = self._guidance(ids.shape[0], cond)
        return self.tokenizer.decode_codes(ids.clamp(0, self.V - 1), guidance).clamp(0, 1)

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1] through p @ E_dec, differentiable."""
        guidance = self._guidance(p.shape[0], cond)
        return self.tokenizer.decode_codes(p, guidance).clamp(0, 1)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 2.0) -> torch.Tensor:
        """MaskGen_VQ.generate -> tokens [B, L] (< V), all randomness from ``generator``.

        At progress t = (s+1)/S: CFG weight w = (cfg − 1)(1 − cos πt)/2 + 1 on logits c + (c − u)·w
        (u: the empty prompt); softmax temperature ``temperature``·(0.5 + 0.8(1 − t)) (1 = published);
        Gumbel-max token choice and Gumbel-perturbed confidence, both at ``randomize``·(1 − t); the
        floor(L·mask_ratio(t)) least confident new tokens are masked again (arccos schedule).
        """
        if temperature <= 0 or steps < 1:
            raise ValueError(f"need steps >= 1 and temperature > 0, got {steps} and {temperature}")
        b, n = cond.shape[0], self.seq_len
        cond = cond.to(self.device, torch.float32)
        text, _, pooled, aesthetic = self.split_condition(torch.cat([cond, self.null_condition(b)]))
        ids = torch.full((b, n), self.mask_id, dtype=torch.long, device=self.device)
        for step in range(steps):
            t = (step + 1) / steps
            noise = randomize * (1.0 - t)
            is_mask = ids == self.mask_id
            w = (cfg - 1.0) * (1.0 - math.cos(math.pi * t)) / 2.0 + 1.0
            c, u = self.backbone(torch.cat([ids, ids]), text, pooled, aesthetic).float().chunk(2)
            logits = (c + (c - u) * w) / (temperature * (0.5 + 0.8 * (1.0 - t)))
            sampled = (logits + noise * _gumbel(logits.shape, generator, logits.device)).argmax(-1)
            sampled = torch.where(is_mask, sampled, ids)
            if step == steps - 1:
                return sampled
            conf = logits.gather(-1, sampled[..., None])[..., 0]
            conf = torch.where(is_mask, conf, torch.full_like(conf, math.inf))
            conf = conf + noise * _gumbel(conf.shape, generator, conf.device)
            # every row has the same number of masked tokens (the schedule is shared)
            remask = math.floor(n * mask_ratio(t, self.mask_schedule))
            remask = max(1, min(int(is_mask[0].sum()) - 1, remask))
            cut = conf.sort(dim=-1).values[:, remask - 1:remask]
            ids = torch.where(conf <= cut, torch.full_like(sampled, self.mask_id), sampled)
        return ids


# ----------------------------------------------------------------- loading
def _folder_files(folder: Path, key: str) -> tuple[dict, Path]:
    """config.json (parsed) and the weight file of a HubMixin folder; a missing one names the key."""
    config = folder / "config.json"
    if not config.is_file():
        raise TeacherFilesMissing(f"teacher.paths.{key}", f"{folder} has no config.json")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise TeacherFilesMissing(f"teacher.paths.{key}", f"{folder} has no {' or '.join(WEIGHT_FILES)}")
    return json.loads(config.read_text()), weights


def _tie_head(state: dict, config: MaskGenConfig, source: str) -> dict:
    """safetensors keeps one name of the tied pair (embeddings.weight): restore lm_head.weight."""
    if not config.weight_tying or "embeddings.weight" not in state:
        return state
    head = state.get("lm_head.weight")
    if head is None:
        return {**state, "lm_head.weight": state["embeddings.weight"]}
    if not torch.equal(head, state["embeddings.weight"]):
        raise StateDictMismatch(f"{source}: lm_head.weight differs from embeddings.weight, "
                                "but the config ties them (weight_tying)")
    return state


def load_generator(folder: Path) -> MaskGenVQ:
    """MaskGen-VQ from its HubMixin folder, loaded strictly."""
    raw, weights = _folder_files(folder, "generator")
    config = MaskGenConfig.from_dict(raw)
    net = MaskGenVQ(config)
    load_strict(net, _tie_head(dict(read_tensors(weights)), config, str(weights)), str(weights))
    return net


def load_tokenizer(folder: Path) -> TATiTokDecoderSide:
    """The TA-TiTok decoder side from its HubMixin folder; encoder tensors are read but set aside."""
    raw, weights = _folder_files(folder, "tokenizer")
    config = TATiTokConfig.from_dict(raw)
    net = TATiTokDecoderSide(config)
    state, _ = split_encoder_keys(read_tensors(weights), config)
    load_strict(net, state, str(weights))
    return net


def load(paths: dict[str, Path], options: dict, device) -> MaskGenTeacher:
    """The MaskGen teacher from ``teacher.paths`` (generator, tokenizer, text_encoder | text_features)."""
    for name in options:
        if name not in OPTIONS:
            raise TeacherOptionError(f"teacher.options.{name}",
                                     f"unknown; MaskGen takes {', '.join(OPTIONS)}")
    aesthetic = options.get("aesthetic_score")
    if aesthetic is not None and (isinstance(aesthetic, bool) or not isinstance(aesthetic, (int, float))):
        raise TeacherOptionError("teacher.options.aesthetic_score", f"must be a number, got {aesthetic!r}")
    backbone = load_generator(Path(paths["generator"])).to(device)
    tokenizer = load_tokenizer(Path(paths["tokenizer"])).to(device)
    text = None
    if paths.get("text_encoder"):        # a real encoder handles any prompt: it wins over a file
        from .maskgen_text import OpenClipText

        text = OpenClipText.from_file(paths["text_encoder"], device)
    elif paths.get("text_features"):
        from .text_features import PrecomputedText

        text = PrecomputedText(paths["text_features"], device)
    return MaskGenTeacher(backbone, tokenizer, text, None if aesthetic is None else float(aesthetic))
