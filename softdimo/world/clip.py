"""A tiny CLIP in open_clip's own architecture, trained on the shapes world.

It gives the text-to-image teacher its conditions (ClipText: per-token text features [B, T, C]) and
the trainer a differentiable CLIP reward (ClipScore). It is saved as an open_clip ``local-dir``
folder (open_clip_config.json + open_clip_model.safetensors) and loaded back through open_clip's
normal path, so the same code reads a real CLIP folder at scale.

Shapes: B batch, T text context length, C text width, E joint embedding width.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from softdimo.world.layout import seeded_init

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# OpenAI CLIP's normalisation constants, as open_clip's default preprocess uses them
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def clip_model_config() -> dict:
    """The tiny open_clip model_cfg: ViT 32 px / patch 4, widths 64, E = 64, text context 16.

    The longest world caption is 13 BPE tokens with SOT/EOT; a short context keeps the t2i
    teacher's prefix (T = 16 condition tokens) cheap.
    """
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "head_width": 16,
                       "layers": 3, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4,
                     "layers": 3, "mlp_ratio": 4.0},
    }


def preprocess_config() -> dict:
    return {"size": 32, "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear",
            "resize_mode": "squash"}


def _tokenizer(context_length: int):
    import open_clip
    # the bundled BPE vocabulary: no download
    return open_clip.SimpleTokenizer(context_length=context_length)


def _new_model(generator: torch.Generator) -> torch.nn.Module:
    from open_clip.model import CLIP
    # the class open_clip.create_model instantiates for this config, so load_clip rebuilds it
    with seeded_init(generator):
        return CLIP(**clip_model_config())


def _preprocess(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                size: int) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> normalised [B, 3, size, size], differentiable."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - m) / s


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, same: torch.Tensor,
              logit_scale: torch.Tensor, negative_emb: torch.Tensor | None = None,
              same_negative: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row and optional hard-negative captions.

    image_emb, text_emb: normalised [B, E]; same [B, B] bool marks pairs with the same caption,
    which are positives too (captions repeat in a batch; treating them as negatives is wrong).
    negative_emb [B', E]: extra caption columns for the image -> text direction only;
    same_negative [B, B'] marks the ones that happen to be true for an image.
    """
    scale = logit_scale.exp()
    logits = scale * image_emb @ text_emb.T
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    text_loss = F.cross_entropy(logits.T, target)
    if negative_emb is not None:
        logits = torch.cat([logits, scale * image_emb @ negative_emb.T], dim=1)
        target = torch.cat([same, same_negative], dim=1).float()
        target = target / target.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + text_loss)


def train_clip(images: torch.Tensor, captions: Sequence[str], steps: int, batch_size: int,
               lr: float, generator: torch.Generator, progress: bool = True,
               negatives: Sequence[str] | None = None) -> tuple[torch.nn.Module, dict]:
    """Contrastive training on (image uint8 [N, 3, 32, 32], caption) pairs -> (model, stats).

    negatives (optional, one per image): a caption false for that image that differs in one
    attribute (scenes.hard_negative); without them CLIP learns a bag of words and cannot tell
    "a circle left of a square" from "a circle right of a square".

    stats: final loss, batch retrieval accuracy (image -> text, counting caption duplicates as
    correct) averaged over the last 50 steps, and the learned logit scale.
    """
    model = _new_model(generator)
    model.train()
    cfg = clip_model_config()
    tok = _tokenizer(cfg["text_cfg"]["context_length"])
    unique = sorted(set(captions) | set(negatives or ()))
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions], dtype=torch.long)
    negative_ids = None if negatives is None else torch.tensor([index[c] for c in negatives])
    text_tokens = tok(unique)                                      # [U, T]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    accs: list[float] = []
    losses: list[float] = []
    n = images.shape[0]
    for _ in tqdm(range(steps), desc="clip", disable=not progress, leave=False):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        x = _preprocess(images[idx].float() / 255, MEAN, STD, cfg["vision_cfg"]["image_size"])
        cid = caption_ids[idx]
        nid = None if negative_ids is None else negative_ids[idx]
        # captions repeat within a batch: encode each distinct one once, then gather
        used, inverse = torch.unique(cid if nid is None else torch.cat([cid, nid]),
                                     return_inverse=True)
        emb = F.normalize(model.encode_text(text_tokens[used]), dim=-1)[inverse]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = emb[:batch_size]
        same = cid[:, None] == cid[None, :]
        neg = None if nid is None else emb[batch_size:]
        same_neg = None if nid is None else cid[:, None] == nid[None, :]
        loss = clip_loss(img, txt, same, model.logit_scale, neg, same_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            # CLIP's usual clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, 4.6052)
            hit = same[torch.arange(batch_size), (img @ txt.T).argmax(dim=1)]
        accs.append(hit.float().mean().item())
        losses.append(loss.item())
    model.eval()
    tail = slice(-min(50, len(losses)), None)
    stats = {"loss": sum(losses[tail]) / len(losses[tail]),
             "train_accuracy": sum(accs[tail]) / len(accs[tail]),
             "logit_scale": float(model.logit_scale.detach().exp()), "unique_captions": len(unique)}
    return model, stats


def save_clip(model: torch.nn.Module, directory: str | Path) -> None:
    """Write an open_clip local-dir folder: open_clip_config.json + open_clip_model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": clip_model_config(), "preprocess_cfg": preprocess_config()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))


def load_clip(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load through ``open_clip.create_model("local-dir:...")``, offline; eval mode, frozen."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory}: not an open_clip local-dir folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    model = open_clip.create_model("local-dir:" + str(directory.resolve()), device=device)
    model.eval().requires_grad_(False)
    return model


def _clip_preprocess_cfg(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float], int]:
    from open_clip import get_model_preprocess_cfg
    cfg = get_model_preprocess_cfg(model) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return cfg.get("mean", MEAN), cfg.get("std", STD), int(size)


class ClipText:
    """Prompts -> the text tower's per-token features [B, T, C] (no grad), the t2i condition.

    Mirrors ``CLIP.encode_text`` up to ``ln_final`` (token + positional embedding, the causal
    transformer, final LayerNorm) and stops before pooling and projection.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.tokenizer = _tokenizer(model.context_length)
        self.length = int(model.context_length)                 # T
        self.dim = int(model.token_embedding.embedding_dim)     # C

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts)).to(self.model.token_embedding.weight.device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        m = self.model
        text = self.tokens(prompts)
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast_dtype)
        x = x + m.positional_embedding.to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x).float()


class ClipScore:
    """Cosine similarity between CLIP image and text embeddings, [B]; differentiable in images.

    Text embeddings are cached per prompt (the text tower is frozen).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.mean, self.std, self.size = _clip_preprocess_cfg(model)
        self.tokenizer = _tokenizer(model.context_length)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings [B, E]."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            device = self.model.token_embedding.weight.device
            emb = F.normalize(self.model.encode_text(self.tokenizer(missing).to(device)), dim=-1)
            self._cache.update(zip(missing, emb))
        return torch.stack([self._cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised image embeddings [B, E]."""
        x = _preprocess(images, self.mean, self.std, self.size)
        return F.normalize(self.model.encode_image(x), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        text = self.text_embeddings(prompts).to(images.dtype)
        return (self.image_embeddings(images) * text).sum(dim=-1)
