"""The embedded world's teacher behind the Teacher protocol (softdimo.teachers.protocol).

Wraps a trained MaskTransformer φ (softdimo.world.mdm) and its VQTokenizer. Shapes: B batch, L tokens,
V codes (= the tokenizer's K), D the transformer width, T text tokens, C text feature width.

Everything the adapter holds is frozen and in eval mode; the trainer deep-copies ``backbone`` for the
student θ and the auxiliary ψ and un-freezes those copies itself.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from softdimo.math.dimo import cfg_combine
from softdimo.world.mdm import MaskTransformer
from softdimo.world.sampler import cfg_ramp, maskgit_sample
from softdimo.world.tokenizer import VQTokenizer

TextEncoder = Callable[[list[str]], torch.Tensor]


class WorldTeacher:
    """Teacher protocol for the shapes world, class- or text-conditioned (read from the backbone config)."""

    def __init__(self, backbone: MaskTransformer, tokenizer: VQTokenizer,
                 text_encoder: TextEncoder | None = None):
        config = backbone.config
        if config.codebook_size != tokenizer.config.codebook_size:
            raise ValueError(f"backbone predicts {config.codebook_size} codes, "
                             f"the tokenizer has {tokenizer.config.codebook_size}")
        if config.seq_len != tokenizer.seq_len:
            raise ValueError(f"backbone takes {config.seq_len} tokens, "
                             f"the tokenizer makes {tokenizer.seq_len}")
        if config.conditioning == "text" and text_encoder is None:
            raise ValueError("a text-conditioned teacher needs a text_encoder (prompts -> [B, T, C])")
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.conditioning: str = config.conditioning
        self.V: int = config.codebook_size
        self.mask_id: int = backbone.mask_id
        self.seq_len: int = config.seq_len
        self.token_shape: tuple = (config.seq_len,)
        self.depth: int = config.depth
        self.hidden_width: int = config.width
        self.feature_len: int = config.seq_len
        self.num_classes: int = config.num_classes if config.conditioning == "class" else 0
        self.image_size: int = tokenizer.config.image_size
        # what the world's LOG figures use: 16 steps, CFG 2 (c2i), MaskGit's Gumbel 4.5
        self.sampling: dict = {"steps": 16, "cfg": 2.0, "temperature": 1.0, "randomize": 4.5}
        grid = tokenizer.grid
        self.grid_shape: tuple = (grid, grid)          # how the L tokens tile the image (row-major)
        self._null_text: torch.Tensor | None = None    # features of "" [1, T, C], computed once

    @property
    def device(self) -> torch.device:
        return self.backbone.pos_emb.device

    def to(self, device: torch.device | str) -> "WorldTeacher":
        """Move backbone, tokenizer and the cached null text features to ``device``."""
        self.backbone.to(device)
        self.tokenizer.to(device)
        if self._null_text is not None:
            self._null_text = self._null_text.to(device)
        return self

    # ----------------------------------------------------------------- embeddings
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> input embeddings [B, L, D]."""
        return self.backbone.tok_emb(ids)

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> E^T p [B, L, D] over the V code rows (Eq. 3; the [MASK] row is excluded)."""
        return p @ self.backbone.tok_emb.weight[:self.V]

    def mask_embedding(self) -> torch.Tensor:
        """The [MASK] input embedding, [D]."""
        return self.backbone.tok_emb.weight[self.mask_id]

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run φ, θ or ψ from embeddings e [B, L, D] -> (logits [B, L, V], hidden [B, L, D] per layer)."""
        return net.forward_embeddings(e, cond, layers)

    def make_student(self) -> nn.Module:
        """A trainable copy of φ (for θ and ψ) with its input-embedding layer frozen (Table 5)."""
        net = copy.deepcopy(self.backbone).requires_grad_(True).train()
        net.tok_emb.requires_grad_(False)
        return net

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Class ids [B] (class teacher) or B prompts (text teacher) -> the backbone's condition."""
        if self.conditioning == "class":
            if labels is None or prompts is not None:
                raise ValueError("the class-conditioned teacher takes labels, not prompts")
            return torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if prompts is None or labels is not None:
            raise ValueError("the text-conditioned teacher takes prompts, not labels")
        with torch.no_grad():
            feats = self.text_encoder(list(prompts))
        return feats.to(device=self.device, dtype=torch.float32)

    def null_condition(self, batch: int) -> torch.Tensor:
        """Null class ids [B] (= num_classes), or the empty prompt's features repeated, [B, T, C]."""
        if self.conditioning == "class":
            return self.backbone.null_condition(batch)
        if self._null_text is None:
            self._null_text = self.encode_condition(prompts=[""])
        return self._null_text.expand(batch, -1, -1).clone()

    # ----------------------------------------------------------------- images
    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L] -> images [B, 3, H, W] in [0, 1]; ids are clamped to [0, V−1] first."""
        return self.tokenizer.decode_ids(ids.clamp(0, self.V - 1))

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1], differentiable in p."""
        return self.tokenizer.decode_probs(p)

    # ----------------------------------------------------------------- sampling
    def guided_logits(self, ids: torch.Tensor, cond: torch.Tensor, weight: float,
                      null: torch.Tensor | None = None) -> torch.Tensor:
        """CFG logits u + w·(c − u) [B, L, V] from one backbone pass on the doubled batch [cond; null]."""
        b = ids.shape[0]
        null = self.null_condition(b) if null is None else null
        both = self.backbone(torch.cat([ids, ids]), torch.cat([cond, null.to(cond.dtype)]))
        c, u = both[:b], both[b:]
        return cfg_combine(u, c, weight)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 4.5) -> torch.Tensor:
        """MaskGit sampling with the CFG weight ramped linearly from 1 to ``cfg`` -> tokens [B, L] (< V).

        With cfg = 1 every step's weight is 1 and the doubled batch is skipped (the result is c).
        """
        b = cond.shape[0]
        weights = iter(cfg_ramp(steps, cfg))       # maskgit_sample calls logits_fn once per step
        null = self.null_condition(b) if cfg != 1.0 else None

        def logits_fn(ids: torch.Tensor) -> torch.Tensor:
            w = next(weights)
            if null is None:
                return self.backbone(ids, cond)
            return self.guided_logits(ids, cond, w, null)

        return maskgit_sample(logits_fn, b, self.seq_len, self.mask_id, steps, generator,
                              temperature=temperature, randomize=randomize, device=self.device)
