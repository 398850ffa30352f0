"""The Hugging Face CLIP text encoder of aMUSEd and Meissonic, loaded from local folders only.

Both pipelines condition on ``CLIPTextModelWithProjection``: the penultimate hidden states
(``hidden_states[-2]``, [B, 77, C]) as the token condition and ``text_embeds`` ([B, P]) as the pooled
one. Weights are read with safetensors and loaded strictly (softdimo.checkpoints).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


class ClipTextEncoder:
    """prompts -> (hidden_states[-2] [B, T, C], text_embeds [B, P]), no grad, padded to max length."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_folders(cls, text_encoder: str | Path, tokenizer: str | Path,
                     device: torch.device | str = "cpu") -> "ClipTextEncoder":
        """``text_encoder``: a folder with config.json + model.safetensors; ``tokenizer``: a CLIP
        tokenizer folder (vocab.json, merges.txt, ...). Nothing is downloaded."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

        from softdimo.checkpoints import load_strict, read_tensors

        folder = Path(text_encoder)
        weights = next((folder / n for n in ("model.safetensors", "model.fp16.safetensors")
                        if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no model.safetensors")
        model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder), local_files_only=True))
        state = {k: v.float() for k, v in read_tensors(weights).items()}
        # transformers keeps position_ids as a non-persistent buffer; older exports still carry it
        state.pop("text_model.embeddings.position_ids", None)
        load_strict(model, state, str(weights))
        tok = CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        return cls(model, tok, device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        out = self.model(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].float(), out.text_embeds.float()
