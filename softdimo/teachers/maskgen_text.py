"""MaskGen's text features from OpenCLIP ViT-L-14-336 (openai), from a local weights file only.

One pass of the text tower gives the three tensors MaskGen + TA-TiTok need (README_MaskGen.md and
``open_clip_text_encoding`` in bytedance/1d-tokenizer ``modeling/maskgen.py``):
- the generator's token condition: the states *before the last* residual block (penultimate), [B, T, C];
- the generator's pooled condition: ``ln_final`` states pooled at the end-of-text token, times
  ``text_projection``, [B, C];
- the TA-TiTok decoder's text guidance: the *final* states after ``ln_final``, [B, T, C].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

OPENCLIP_MODEL = "ViT-L-14-336"


class OpenClipText:
    """prompts -> (penultimate [B, T, C], final [B, T, C], pooled [B, C]), no grad, float32."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str = "cpu"):
        if getattr(model, "visual", None) is not None:
            model.visual = None                 # the image tower is not needed (upstream deletes it too)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, weights: str | Path, device: torch.device | str = "cpu") -> "OpenClipText":
        """``weights``: open_clip_pytorch_model.bin of ViT-L-14-336 (openai). Nothing is downloaded.

        open_clip loads a local file strictly (``load_checkpoint(strict=True)``, ``weights_only``).
        QuickGELU is forced: the openai weights were trained with it, and open_clip only switches it
        on by itself for the ``pretrained="openai"`` tag, not for a file path.
        """
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        model = open_clip.create_model(OPENCLIP_MODEL, pretrained=str(weights), force_quick_gelu=True)
        # the bundled BPE vocabulary; get_tokenizer would build the same SimpleTokenizer for this model
        return cls(model, SimpleTokenizer(context_length=model.context_length), device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from open_clip.transformer import text_global_pool

        m = self.model
        ids = self.tokenizer(list(prompts)).to(self.device)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding.to(cast)
        for block in m.transformer.resblocks[:-1]:      # open_clip 3 blocks take [B, T, C]
            x = block(x, attn_mask=m.attn_mask)
        penultimate = x
        final = m.ln_final(m.transformer.resblocks[-1](x, attn_mask=m.attn_mask))
        pooled = text_global_pool(final, ids, m.text_pool_type,
                                  eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return penultimate.float(), final.float(), pooled.float()
