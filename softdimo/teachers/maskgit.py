"""MaskGIT v1 (valeoai/Maskgit-pytorch, branch v1.0) behind the Teacher protocol (teachers.md §2).

Files (``teacher.paths``): ``transformer`` = MaskGIT_ImageNet_256.pth (a dict whose
``model_state_dict`` is the MaskTransformer's), ``vqgan`` = the taming VQGAN's Lightning
``last.ckpt`` (weights under ``state_dict``), ``vqgan_config`` = its ``model.yaml``
(``model.params``: embed_dim, n_embed, ddconfig). Both weight files load strictly; from the VQGAN
only the decoder side is kept (``DECODER_PREFIXES``) and the rest must be in ``IGNORED_PREFIXES``.

Shapes: B batch, L = 256 image tokens (16×16, row-major), V = 1024 codes, [MASK] = 1024,
D = 768 (input embedding and hidden width). Logits are [B, L, V + 1] with the mask column by default
(Table 5's "Output Logits Dimension", and the Di[M]O code's divergences and cross-entropy over 1025
classes); ``teacher.options.mask_logit: false`` gives [B, L, V]. Conditions are class labels [B] in [0, 1000); the null
class is 1000, which the transformer reads as token 1025 + 1000 = 2025 (upstream's dropped label).
"""
from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Sequence

import torch
import yaml
from torch import nn

from softdimo.checkpoints import StateDictMismatch, load_strict, read_tensors
from softdimo.teachers import TeacherOptionError

from .maskgit_modules import MaskTransformer, VQGANDecoder

# Published 256-px transformer (v1.0 Trainer/vit.py "base"); codebook_size and f_factor default to
# what the VQGAN implies (n_embed; img_size / downsampling), as upstream computes them. dropout only
# acts in train mode, i.e. in the students θ and ψ (Di[M]O trains its copies with the same 0.1).
DEFAULTS = {"img_size": 256, "hidden_dim": 768, "depth": 24, "heads": 16, "mlp_dim": 3072,
            "dropout": 0.1, "nclass": 1000, "codebook_size": None, "f_factor": None}
# VQModel state_dict prefixes: what decoding needs, and what is left out on purpose (encoder side
# and the Lightning loss module: LPIPS + discriminator). Any other key is an error.
DECODER_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")
IGNORED_PREFIXES = ("encoder.", "quant_conv.", "loss.")
# ddconfig keys that only the encoder reads; everything else must be a Decoder argument.
_ENCODER_ONLY = {"double_z", "in_channels"}
# README table of v1.0: arccos schedule, "linear" randomisation, softmax temperature 1.
PUBLISHED_SAMPLING = {256: {"steps": 8, "cfg": 3.0, "temperature": 1.0, "randomize": 4.5},
                      512: {"steps": 15, "cfg": 2.8, "temperature": 1.0, "randomize": 7.0}}


class MaskGitTeacher:
    """Teacher protocol over a MaskGIT v1 transformer and the taming VQGAN decoder."""

    conditioning = "class"

    def __init__(self, backbone: MaskTransformer, vqgan: VQGANDecoder, mask_logit: bool = True):
        self.mask_logit = mask_logit
        self.backbone = backbone.eval().requires_grad_(False)
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.V: int = backbone.codebook_size
        self.mask_id: int = backbone.mask_id
        self.seq_len: int = backbone.seq_len
        self.token_shape: tuple = (self.seq_len,)
        self.grid_shape: tuple = (backbone.patch_size, backbone.patch_size)   # row-major token grid
        self.depth: int = len(backbone.transformer.layers)
        self.hidden_width: int = backbone.tok_emb.embedding_dim
        self.feature_len: int = self.seq_len                 # the class position is dropped
        self.num_classes: int = backbone.nclass
        self.image_size: int = backbone.patch_size * vqgan.downsampling
        self.sampling: dict = dict(PUBLISHED_SAMPLING.get(self.image_size, PUBLISHED_SAMPLING[256]))

    @property
    def device(self) -> torch.device:
        return self.backbone.pos_emb.device

    def to(self, device: torch.device | str) -> "MaskGitTeacher":
        self.backbone.to(device)
        self.vqgan.to(device)
        return self

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> ``tok_emb`` rows [B, L, D] (before pos_emb and the first LN)."""
        return self.backbone.tok_emb(ids)

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] or [B, L, V + 1] -> E^T p [B, L, D] over the code rows, and the [MASK] row
        for the mask column (Eq. 3: the soft embedding of the distribution the logits define)."""
        return p @ self.backbone.tok_emb.weight[:p.shape[-1]].to(p.dtype)

    def mask_embedding(self) -> torch.Tensor:
        """The [MASK] row of ``tok_emb``, [D]."""
        return self.backbone.tok_emb.weight[self.mask_id]

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ from e [B, L, D] with labels cond [B] -> (logits [B, L, V + 1], or
        [B, L, V] without ``mask_logit``; hidden states [B, L, D] after each block in ``layers``)."""
        logits, hidden = net.forward_embeddings(e, cond, layers)
        return logits[..., :self.V + int(self.mask_logit)], hidden

    def make_student(self) -> nn.Module:
        """A trainable copy of φ with ``tok_emb`` frozen (Table 5). The output head is tied to
        ``tok_emb``, so it stays fixed too; ``bias`` and ``last_layer`` still train."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.tok_emb.requires_grad_(False)
        return net

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Class labels [B] in [0, num_classes) -> a new long tensor [B] on the teacher's device."""
        if labels is None or prompts is not None:
            raise ValueError("MaskGIT is class-conditioned: pass labels, not prompts")
        y = torch.as_tensor(labels).to(device=self.device, dtype=torch.long).clone().reshape(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y

    def null_condition(self, batch: int) -> torch.Tensor:
        """The dropped label [B] (= num_classes, token id K + 1 + num_classes)."""
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.device)

    # ----------------------------------------------------------------- images
    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)          # taming decodes to [-1, 1]

    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] (as upstream)."""
        z = self.vqgan.quantize.embedding(ids.clamp(0, self.V - 1))
        return self._to_unit(self.vqgan.decode_latents(z, self.grid_shape))

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, L, V] (or [B, L, V + 1]) -> images [B, 3, H, W] in [0, 1] from
        p @ codebook, differentiable. The VQGAN has no [MASK] code: a mask column is dropped and the
        codes' share renormalised (ours; hard decoding clamps a sampled [MASK] to V − 1 instead)."""
        if p.shape[-1] == self.V + 1:
            p = p[..., :self.V] / p[..., :self.V].sum(-1, keepdim=True).clamp_min(1e-12)
        z = p @ self.vqgan.quantize.embedding.weight.to(p.dtype)
        return self._to_unit(self.vqgan.decode_latents(z, self.grid_shape))

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 4.5) -> torch.Tensor:
        """v1.0 ``Trainer/vit.py`` sample -> tokens [B, L] (< V). Upstream's conventions, not u + w(c − u):

        - ``cfg`` = w: step i of S uses w_i = w·i/(S−1) and logits (1 + w_i)·c − w_i·u; w = 0 is a
          single conditional pass;
        - ``temperature`` multiplies the logits (upstream ``sm_temp``);
        - tokens ~ Categorical(softmax) over the K+1 outputs, [MASK] included as upstream does;
          a committed [MASK] stays as input and is clamped to K−1 at the end;
        - confidence log p(token) + randomize·Gumbel·(1 − i/(S−1)) ("linear", r_temp); the t_i most
          confident still-masked positions are committed, t_i from ``token_schedule``.
        """
        cond, (b, L) = cond.to(self.device), (cond.shape[0], self.seq_len)
        ids = torch.full((b, L), self.mask_id, dtype=torch.long, device=self.device)
        masked = torch.ones(b, L, dtype=torch.bool, device=self.device)
        null = self.null_condition(b)
        denom = max(steps - 1, 1)                          # upstream divides by S−1 (S = 1: w_0 = 0)
        for i, t in enumerate(token_schedule(steps, L)):
            e = self.embed_ids(ids)
            if cfg != 0:
                both = self.backbone.forward_embeddings(torch.cat([e, e]), torch.cat([cond, null]))[0]
                c, u = both.float().chunk(2)
                w = cfg * i / denom
                logits = (1 + w) * c - w * u
            else:
                logits = self.backbone.forward_embeddings(e, cond)[0].float()
            logp = torch.log_softmax(logits * temperature, dim=-1)
            # Gumbel-max draws exactly from Categorical(softmax) with noise from ``generator``.
            token = (logp + _gumbel(logp.shape, generator, logp.device)).argmax(-1)
            conf = logp.gather(-1, token[..., None]).squeeze(-1)
            if randomize:
                conf = conf + randomize * (1 - i / denom) * _gumbel(conf.shape, generator, conf.device)
            conf = conf.masked_fill(~masked, -math.inf)
            commit = torch.zeros_like(masked).scatter_(1, conf.topk(t, dim=-1).indices, True)
            ids = torch.where(commit, token, ids)
            masked &= ~commit
        return ids.clamp(0, self.V - 1)


def token_schedule(steps: int, length: int, mode: str = "arccos") -> list[int]:
    """Tokens to unmask at each step (v1.0 ``adap_sche``): with r = linspace(1, 0, S), shares
    f(r) / Σ f(r) of ``length``, rounded, zeros raised to 1, the remainder added to the last step.

    arccos: f = arccos(r)/(π/2); also cosine cos(πr/2), linear 1 − r, square 1 − r², root 1 − √r.
    One step commits everything (upstream divides 0 by 0 there). Σ = ``length``.
    """
    if not 1 <= steps <= length:
        raise ValueError(f"steps must be in [1, {length}], got {steps}")
    if steps == 1:
        return [length]
    r = torch.linspace(1, 0, steps)                      # float32, as upstream
    shapes = {"arccos": lambda: torch.arccos(r) / (math.pi * 0.5),
              "cosine": lambda: torch.cos(r * math.pi * 0.5), "linear": lambda: 1 - r,
              "square": lambda: 1 - r ** 2, "root": lambda: 1 - r ** 0.5}
    if mode not in shapes:
        raise ValueError(f"unknown schedule {mode!r}; expected one of {sorted(shapes)}")
    share = shapes[mode]()
    sched = (share / share.sum() * length).round()
    sched[sched == 0] = 1
    sched[-1] += length - sched.sum()
    # When the floor overshoots (many steps, few tokens) the last entry is ≤ 0 and upstream's loop
    # clamps t to what is left and stops early: return those effective budgets.
    out, left = [], length
    for v in sched.tolist():
        if left == 0:
            break
        out.append(min(int(v), left))
        left -= out[-1]
    return out


def _gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn on the generator's device, moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return (-torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))).to(device)


# --------------------------------------------------------------------- loading
def read_vqgan_config(path: Path) -> tuple[int, int, dict]:
    """model.yaml -> (n_embed, embed_dim, decoder ddconfig) from ``model.params``."""
    with open(path) as f:
        config = yaml.safe_load(f)
    try:
        params = config["model"]["params"]
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
        ddconfig = dict(params["ddconfig"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected model.params with n_embed, embed_dim and ddconfig "
                         f"(taming VQModel config), missing {err}") from None
    if params.get("remap") is not None:
        raise ValueError(f"{path}: a VQGAN with a remapped codebook (remap) is not supported")
    for key, default in (("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False)):
        if ddconfig.pop(key, default) != default:
            raise ValueError(f"{path}: ddconfig.{key} other than {default} is not supported")
    decoder = {k: v for k, v in ddconfig.items() if k not in _ENCODER_ONLY}
    known = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
             "z_channels", "dropout"}
    if set(decoder) - known or known - {"dropout"} - set(decoder):
        raise ValueError(f"{path}: ddconfig keys {sorted(decoder)} do not match the taming Decoder "
                         f"({sorted(known)})")
    return n_embed, embed_dim, decoder


def _options(options: dict, n_embed: int, downsampling: int) -> dict:
    """teacher.options over DEFAULTS, checked; fills codebook_size, img_size and f_factor."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TeacherOptionError(f"teacher.options.{unknown[0]}",
                                 f"unknown MaskGIT option; expected some of "
                                 f"{', '.join(DEFAULTS)}, mask_logit")
    opts = {**DEFAULTS, **options}
    for name, value in opts.items():
        if value is None and DEFAULTS[name] is None:
            continue                                     # derived from the VQGAN below
        kind = float if name == "dropout" else int
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                or (kind is int and int(value) != value) or (kind is float and value >= 1)):
            raise TeacherOptionError(f"teacher.options.{name}",
                                     f"must be a non-negative {kind.__name__}"
                                     f"{' below 1' if kind is float else ''}, got {value!r}")
        opts[name] = kind(value)
    if opts["codebook_size"] is None:
        opts["codebook_size"] = n_embed
    elif opts["codebook_size"] != n_embed:
        raise TeacherOptionError("teacher.options.codebook_size",
                                 f"{opts['codebook_size']} differs from the VQGAN's n_embed {n_embed}")
    if opts["f_factor"] is None:
        opts["f_factor"] = opts["img_size"] // downsampling
    elif "img_size" not in options:
        opts["img_size"] = opts["f_factor"] * downsampling
    if opts["f_factor"] * downsampling != opts["img_size"] or opts["f_factor"] < 1:
        raise TeacherOptionError("teacher.options.img_size",
                                 f"{opts['img_size']} px is not f_factor {opts['f_factor']} tokens × the "
                                 f"VQGAN downsampling {downsampling}")
    if opts["heads"] < 1 or opts["hidden_dim"] % opts["heads"]:
        raise TeacherOptionError("teacher.options.heads",
                                 f"{opts['heads']} heads do not divide hidden_dim {opts['hidden_dim']}")
    return opts


def _read_checkpoint(path: Path) -> dict:
    try:
        return read_tensors(path)
    except pickle.UnpicklingError as err:
        raise StateDictMismatch(f"{path} holds more than tensors and plain containers and is not "
                                f"unpickled (torch.load weights_only=True): {err}") from None


def vqgan_decoder_state(state: dict) -> dict:
    """A VQModel ``state_dict`` without the keys under IGNORED_PREFIXES. Every other key stays, so
    that one outside DECODER_PREFIXES fails ``load_strict`` as unexpected instead of being skipped."""
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def load(paths: dict[str, Path], options: dict, device) -> MaskGitTeacher:
    """Build MaskTransformer and VQGANDecoder from options and model.yaml, load both strictly."""
    n_embed, embed_dim, ddconfig = read_vqgan_config(paths["vqgan_config"])
    vqgan = VQGANDecoder(n_embed, embed_dim, ddconfig)
    options = dict(options)
    mask_logit = options.pop("mask_logit", True)
    if not isinstance(mask_logit, bool):
        raise TeacherOptionError("teacher.options.mask_logit", f"must be true or false, got {mask_logit!r}")
    opts = _options(options, n_embed, vqgan.downsampling)
    ckpt = _read_checkpoint(paths["vqgan"])
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise StateDictMismatch(f"{paths['vqgan']}: expected a Lightning checkpoint with 'state_dict'")
    load_strict(vqgan, vqgan_decoder_state(ckpt["state_dict"]), str(paths["vqgan"]))

    net = MaskTransformer(**opts)
    ckpt = _read_checkpoint(paths["transformer"])
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise StateDictMismatch(f"{paths['transformer']}: expected a dict with 'model_state_dict' "
                                f"(MaskGIT v1 .pth)")
    load_strict(net, ckpt["model_state_dict"], str(paths["transformer"]))
    return MaskGitTeacher(net.to(device), vqgan.to(device), mask_logit)
