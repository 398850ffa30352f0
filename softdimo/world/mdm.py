"""The embedded world's MaskGit-style teacher: a bidirectional transformer over VQ tokens (dimo.md §2).

Shapes: B batch, L image token positions, K codebook size (output classes; the input vocabulary is
K + 1 with [MASK] = K), W width, T text tokens, C text feature width.

Differences from MaskGit v1, on purpose: the output head is a separate Linear over the K codes (not
tied to ``tok_emb`` and without a mask column), so that a student that freezes its input table still
trains its head; conditioning has its own tables instead of sharing ``tok_emb``:
- class: ``cls_emb`` with num_classes + 1 rows (the last is the null class for CFG), appended as one
  sequence element after the L image tokens, as MaskGit appends its class token;
- text: CLIP token features [B, T, C] -> Linear(C, W) + their own positional embedding, prepended as
  T prefix tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from softdimo.math.masking import forward_mask

from .tokenizer import load_state_strict, read_config, save_module

__all__ = ["MDMConfig", "MaskTransformer", "train_mdm", "save_module", "load_mdm"]


@dataclass
class MDMConfig:
    codebook_size: int               # K
    seq_len: int                     # L
    conditioning: str                # "class" | "text"
    num_classes: int = 0
    text_dim: int = 0                # C
    text_len: int = 0                # T (the most prefix tokens accepted)
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0


class Block(nn.Module):
    """Pre-norm transformer block with full bidirectional attention, [B, N, W] -> [B, N, W]."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, n, w)), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


class MaskTransformer(nn.Module):
    """Bidirectional masked-token transformer: ids [B, L] (+ condition) -> logits [B, L, K]."""

    def __init__(self, config: MDMConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        k, w = config.codebook_size, config.width
        self.mask_id = k
        self.tok_emb = nn.Embedding(k + 1, w)                    # row K = [MASK]
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len, w))
        if config.conditioning == "class":
            if config.num_classes <= 0:
                raise ValueError("class conditioning needs num_classes > 0")
            self.cls_emb = nn.Embedding(config.num_classes + 1, w)     # row num_classes = null
        elif config.conditioning == "text":
            if config.text_dim <= 0 or config.text_len <= 0:
                raise ValueError("text conditioning needs text_dim > 0 and text_len > 0")
            self.text_proj = nn.Linear(config.text_dim, w)
            self.text_pos = nn.Parameter(torch.zeros(1, config.text_len, w))
        else:
            raise ValueError(f"conditioning must be 'class' or 'text', got {config.conditioning!r}")
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(w, config.heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, k)                              # untied from tok_emb
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator | None) -> None:
        # Truncated normal, std 0.02 (as MaskGit), drawn from ``generator`` for reproducible builds.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_emb, getattr(self, "text_pos", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The null class ids [B] (class conditioning only; text needs the encoder's empty prompt)."""
        if self.config.conditioning != "class":
            raise ValueError("the text null condition is the text encoder's features of the empty prompt")
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=self.pos_emb.device)

    def forward_embeddings(self, e: torch.Tensor, cond: torch.Tensor, layers: Sequence[int] = ()
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """e [B, L, W] input embeddings, cond (class ids [B] or text features [B, T, C]).

        Returns logits [B, L, K] for the image positions and, for each block index in ``layers``
        (0-based, negatives count from the end), the image positions' hidden states [B, L, W] after it.
        """
        depth = self.config.depth
        wanted = [i + depth if i < 0 else i for i in layers]
        if any(not 0 <= i < depth for i in wanted):
            raise ValueError(f"layers {list(layers)} out of range for depth {depth}")
        x = e + self.pos_emb[:, :e.shape[1]]
        if self.config.conditioning == "class":
            c = self.cls_emb(cond.long())[:, None]
            x, start = torch.cat([x, c], dim=1), 0
        else:
            t = cond.shape[1]
            if t > self.config.text_len:
                raise ValueError(f"{t} text tokens, the model accepts at most {self.config.text_len}")
            c = self.text_proj(cond.to(x.dtype)) + self.text_pos[:, :t]
            x, start = torch.cat([c, x], dim=1), t
        x = self.drop(x)
        end = start + e.shape[1]
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                hidden[i] = x[:, start:end]
        logits = self.head(self.norm(x[:, start:end]))
        return logits, [hidden[i] for i in wanted]

    def forward(self, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> logits [B, L, K]."""
        return self.forward_embeddings(self.tok_emb(ids), cond)[0]


# --------------------------------------------------------------------- training
def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr`` (the end of a short run gains from the decay)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _drop_condition(cond: torch.Tensor, null_cond: torch.Tensor, drop_prob: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Replace each row of cond [B, ...] by null_cond with probability ``drop_prob`` (CFG training)."""
    drop = torch.rand(cond.shape[0], generator=generator) < drop_prob
    drop = drop.to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(drop, null_cond.to(device=cond.device, dtype=cond.dtype).expand_as(cond), cond)


def train_mdm(model: MaskTransformer, tokens: torch.Tensor, conds: torch.Tensor, null_cond: torch.Tensor,
              steps: int, batch_size: int, lr: float, generator: torch.Generator, drop_prob: float = 0.1,
              progress: bool = True, warmup: int | None = None) -> dict:
    """Train ``model`` in place on tokens [N, L] with conditions conds [N] or [N, T, C].

    Per step: a batch without replacement (epoch permutations), arccos exact-count masking
    (softdimo.math.masking.forward_mask), condition dropout to ``null_cond`` (one row of conds, broadcast),
    cross-entropy with label smoothing 0.1 on the masked tokens, AdamW (betas 0.9/0.96, wd 1e-5 as
    MaskGit), warm-up then cosine decay, grad-norm clip 1. All randomness from ``generator``.
    Returns stats: losses (mean per 50-step window), final_loss (mean of the last 10%), seconds, steps_per_s.
    """
    device = model.pos_emb.device
    tokens, conds = tokens.cpu(), conds.cpu()        # batches are drawn on the CPU, then moved
    n = tokens.shape[0]
    if conds.shape[0] != n:
        raise ValueError(f"{n} token rows but {conds.shape[0]} conditions")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.96), weight_decay=1e-5)
    warmup = max(1, min(200, steps // 10)) if warmup is None else max(1, warmup)
    order, cursor = torch.randperm(n, generator=generator), 0
    history: list[float] = []
    # Dropout (if any) draws from the global RNG: seed it from ``generator`` and restore it afterwards.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    model.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        bar = tqdm(range(steps), desc="teacher", disable=not progress, leave=False)
        for step in bar:
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            x0 = tokens[idx]
            x_t, mask = forward_mask(x0, "arccos", model.mask_id, generator)
            x0, x_t, mask = x0.to(device), x_t.to(device), mask.to(device)
            cond = _drop_condition(conds[idx].to(device), null_cond, drop_prob, generator)
            logits = model(x_t, cond)
            loss = F.cross_entropy(logits[mask], x0[mask], label_smoothing=0.1)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history.append(float(loss.detach()))
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}")
        bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    tail = history[-max(1, steps // 10):]
    windows = [sum(history[i:i + 50]) / len(history[i:i + 50]) for i in range(0, len(history), 50)]
    return {"steps": steps, "losses": windows, "final_loss": sum(tail) / max(1, len(tail)),
            "first_loss": history[0] if history else float("nan"),
            "seconds": seconds, "steps_per_s": steps / max(seconds, 1e-9)}


def load_mdm(path_stem: str | Path, device: torch.device | str = "cpu") -> MaskTransformer:
    """Read a MaskTransformer written by ``save_module``; eval mode, frozen."""
    model = MaskTransformer(read_config(path_stem, MDMConfig))
    load_state_strict(model, path_stem)
    return model.to(device).eval().requires_grad_(False)
