"""MaskGen-VQ (Kim et al. 2025, bytedance/1d-tokenizer ``modeling/maskgen.py``), re-written from its facts.

Shapes: B batch, L image tokens (128, one-dimensional), V codes (8192), D width (1024 for MaskGen-L),
T text tokens (77), C text feature width (768), M micro-condition width (256).

Parameter names follow the published HubMixin folder (``turkeyju/generator_maskgen_vq_l``:
``config.json`` + ``model.safetensors``) so that its weights load strictly:
``embeddings`` (V + 1 + classes + 1 rows: codes, [MASK] = V, unused class ids, their null id),
``pos_embed`` [1, L, D], ``text_embed_proj`` (C -> D), ``cond_pooled_proj`` (C + M -> D),
``blocks.*`` (diffusers ``JointTransformerBlock``, the last one ``context_pre_only``), ``norm``
(diffusers ``AdaLayerNormContinuous``) and ``lm_head``, tied to ``embeddings.weight[:V]``.

Differences from upstream, on purpose: ``forward`` never re-masks its input (upstream masks at random
whenever ``self.training`` is true, which would corrupt a student copy in train mode), and the
forward starts from input embeddings so that soft embeddings E^T p can be fed in (Eq. 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class MaskGenConfig:
    """The fields of the upstream config (``model.vq_model``, ``model.maskgen``) the network reads."""

    codebook_size: int = 8192               # V (model.vq_model.codebook_size)
    seq_len: int = 128                      # L (model.vq_model.num_latent_tokens)
    width: int = 1024                       # D (model.maskgen.decoder_embed_dim)
    depth: int = 16
    heads: int = 16
    text_embed_dim: int = 768               # C (model.vq_model.text_embed_dim)
    micro_condition: bool = True
    micro_condition_embed_dim: int = 256    # M
    condition_num_classes: int = 1000       # only sizes the embedding table
    weight_tying: bool = True
    # upstream's code falls back to 6.0, but its inference configs and README use 6.5
    sample_aesthetic_score: float = 6.5
    mask_schedule_strategy: str = "arccos"
    cfg: float = 12.0                       # published sampler settings (configs/infer/MaskGen)
    num_iter: int = 16
    temperature: float = 2.0                # the Gumbel "randomize" temperature

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "MaskGenConfig":
        """From the nested upstream config (``config.json`` of the HubMixin folder)."""
        try:
            vq, mg = config["model"]["vq_model"], config["model"]["maskgen"]
            return cls(codebook_size=int(vq["codebook_size"]), seq_len=int(vq["num_latent_tokens"]),
                       width=int(mg["decoder_embed_dim"]), depth=int(mg["decoder_depth"]),
                       heads=int(mg["decoder_num_heads"]),
                       text_embed_dim=int(vq.get("text_embed_dim", 768)),
                       micro_condition=bool(mg["micro_condition"]),
                       micro_condition_embed_dim=int(mg.get("micro_condition_embed_dim", 256)),
                       condition_num_classes=int(mg["condition_num_classes"]),
                       weight_tying=bool(mg.get("weight_tying", True)),
                       sample_aesthetic_score=float(mg.get("sample_aesthetic_score", 6.5)),
                       mask_schedule_strategy=str(mg.get("mask_schedule_strategy", "arccos")),
                       cfg=float(mg.get("cfg", 12.0)), num_iter=int(mg.get("num_iter", 16)),
                       temperature=float(mg.get("temperature", 2.0)))
        except KeyError as err:
            raise ValueError(f"MaskGen config lacks {err} (expected model.vq_model / model.maskgen)") from err

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def embedding_rows(self) -> int:
        # codes, [MASK], class ids, class-drop id: the table upstream keeps "for compatibility"
        return self.codebook_size + 1 + self.condition_num_classes + 1


class WeightTiedLMHead(nn.Module):
    """logits = x @ E[:V]^T with E the embedding table's own Parameter (never a copy)."""

    def __init__(self, embeddings: nn.Embedding, codebook_size: int):
        super().__init__()
        self.weight = embeddings.weight          # shared: state dicts list it twice, files store it once
        self.codebook_size = codebook_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight[:self.codebook_size].t()


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """values [B] -> [B, dim]: [sin, cos] of values·exp(−ln(max_period)·k/(dim/2)), zero-padded if odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class MaskGenVQ(nn.Module):
    """The MaskGen-VQ generator: text-conditioned MM-DiT over L one-dimensional VQ tokens."""

    def __init__(self, config: MaskGenConfig):
        super().__init__()
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.normalization import AdaLayerNormContinuous

        c = config
        if c.width % c.heads:
            raise ValueError(f"decoder_embed_dim {c.width} is not divisible by {c.heads} heads")
        self.config = c
        self.text_embed_proj = nn.Linear(c.text_embed_dim, c.width)
        pooled_dim = c.text_embed_dim + (c.micro_condition_embed_dim if c.micro_condition else 0)
        self.cond_pooled_proj = nn.Linear(pooled_dim, c.width)
        self.blocks = nn.ModuleList([
            JointTransformerBlock(dim=c.width, num_attention_heads=c.heads,
                                  attention_head_dim=c.width // c.heads,
                                  context_pre_only=i == c.depth - 1)
            for i in range(c.depth)])
        self.norm = AdaLayerNormContinuous(c.width, c.width, elementwise_affine=False, eps=1e-6)
        self.embeddings = nn.Embedding(c.embedding_rows, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.seq_len, c.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if c.weight_tying:
            self.lm_head = WeightTiedLMHead(self.embeddings, c.codebook_size)
        else:
            self.lm_head = nn.Linear(c.width, c.codebook_size)

    def pooled_condition(self, pooled: torch.Tensor, aesthetic: torch.Tensor) -> torch.Tensor:
        """pooled text [B, C] and aesthetic scores [B] -> the adaptive-norm embedding [B, D].

        The micro-condition is a sinusoid of score·100, as upstream's ``concat_micro_cond``.
        """
        if self.config.micro_condition:
            micro = sinusoidal_embedding(aesthetic * 100, self.config.micro_condition_embed_dim)
            pooled = torch.cat([pooled, micro.to(pooled.dtype)], dim=-1)
        return self.cond_pooled_proj(pooled)

    def forward_embeddings(self, e: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                           aesthetic: torch.Tensor, layers: Sequence[int] = ()
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run from input embeddings e [B, L, D] (the output of ``embeddings``, or E^T p).

        ``text`` [B, T, C]: penultimate CLIP token states; ``pooled`` [B, C]: projected pooled text
        embedding; ``aesthetic`` [B]. Returns logits [B, L, V] and, for each block index in ``layers``
        (negatives count from the end), the image-token hidden states [B, L, D] after that block.
        """
        depth = len(self.blocks)
        wanted = [i + depth if i < 0 else i for i in layers]
        if any(not 0 <= i < depth for i in wanted):
            raise ValueError(f"layers {list(layers)} out of range for depth {depth}")
        dtype = e.dtype
        context = self.text_embed_proj(text.to(dtype))
        temb = self.pooled_condition(pooled.to(dtype), aesthetic)
        x = e + self.pos_embed[:, :e.shape[1]]
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            context, x = block(x, context, temb)        # the last block returns context None
            if i in wanted:
                hidden[i] = x
        logits = self.lm_head(self.norm(x, temb))
        return logits, [hidden[i] for i in wanted]

    def forward(self, ids: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                aesthetic: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (mask id allowed) -> logits [B, L, V]; no re-masking in train mode."""
        return self.forward_embeddings(self.embeddings(ids), text, pooled, aesthetic)[0]
