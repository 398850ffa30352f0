"""ImageReward (Xu et al., 2023) as an in-project port: an evaluation metric and a differentiable reward.

The `image-reward` package cannot be installed next to transformers 5 / open_clip >= 3, so the network is
rebuilt here (encoders in evaluators/networks/blip.py) and the published `ImageReward.pt` is loaded into it:

    h = BERT(prompt tokens, cross-attending in every layer to the ViT's image tokens)
    reward = (head(h[CLS]) - 0.16717...) / 1.03333...

with the head 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts between, no activations) and the published
mean/std normalisation. The checkpoint is a raw state dict (upstream loads `torch.load(path)` straight into
the model); a dict wrapping it under "state_dict" or "model" is accepted too. Its keys are
`blip.visual_encoder.*` (294), `blip.text_encoder.*` (316), `blip.vision_proj.*`/`blip.text_proj.*` (4,
unused), `mlp.layers.{0,2,4,6,7}.*` (10): 624 tensors, plus the persistent buffer
`blip.text_encoder.embeddings.position_ids` that upstream's med.py saves (accepted when present, checked to
be 0..max_positions-1, since positions are computed here). Any other difference raises, listing it.

Preprocessing follows upstream's Resize(224, bicubic) -> CenterCrop(224) -> CLIP mean/std, on tensors
(antialiased bicubic, no 8-bit rounding or clamping, so gradients reach every pixel). Prompts are tokenised
with BERT's uncased WordPiece to 35 tokens ([CLS] ... [SEP], padded), as upstream.

Shapes: B batch, H×W input size, L = 35 tokens.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizer

from evaluators.networks.blip import Blip, BlipConfig
from evaluators.networks.weights import StateDictMismatch, resolve

REWARD_MEAN = 0.16717362830052426    # published normalisation of the raw head output
REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_LEN = 35
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"


class RewardHead(nn.Module):
    """[B, Dt] -> [B, 1]; a stack of linear maps (no activations, as published). The dropouts are kept
    so the parameter indices (layers.0, 2, 4, 6, 7) match the checkpoint."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                                    nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageReward(nn.Module):
    """Normalised reward [B] of preprocessed images [B, 3, S, S] and prompt tokens [B, L]."""

    def __init__(self, config: BlipConfig = BlipConfig()):
        super().__init__()
        self.config = config
        self.blip = Blip(config)
        self.mlp = RewardHead(config.text_width)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        head = self.mlp.layers[0].weight
        raw = self.mlp(text[:, 0].to(head.dtype)).squeeze(-1).float()
        return (raw - REWARD_MEAN) / REWARD_STD


def key_list(config: BlipConfig = BlipConfig()) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint must hold (without the optional position ids)."""
    with torch.device("meta"):
        model = ImageReward(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> [B, 3, size, size], CLIP-normalised; differentiable.

    Shorter side to `size` (the longer one to int(size · long / short), as torchvision's Resize), then
    a centre crop with torchvision's rounding.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"expected float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True,
                               align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    images = images[..., top:top + size, left:left + size]
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def load_tokenizer(vocab: str | Path) -> BertTokenizer:
    """bert-base-uncased WordPiece from a local vocab.txt, plus BLIP's [DEC] (bos) and [ENC] tokens.

    The vocabulary is read here and passed as a dict: transformers 5's BertTokenizer silently ignores
    a `vocab_file=` argument and falls back to a 5-token vocabulary.
    """
    tokens = Path(vocab).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a raw state dict, or one wrapped under "state_dict" or "model"."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (nor one under 'state_dict'/'model')")
    return obj


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
                     ) -> dict[str, torch.Tensor]:
    """`state` without the optional position-id buffer, once its keys and shapes equal the model's;
    otherwise raise StateDictMismatch listing every missing, unexpected and mis-shaped key (all of
    them: the shared `weights.load_strict` cannot be used as it copies into an allocated module)."""
    state = dict(state)
    position_ids = state.pop(POSITION_IDS_KEY, None)
    problems = []
    if position_ids is not None:
        n = model.config.max_positions
        if tuple(position_ids.shape) != (1, n) or not torch.equal(position_ids[0].long(), torch.arange(n)):
            problems.append(f"{POSITION_IDS_KEY} is not arange({n}) of shape [1, {n}]")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {expected[k]} in the model"
              for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
    if problems:
        raise StateDictMismatch(f"{source} does not match ImageReward: " + " | ".join(problems))
    return state


def load_image_reward(path: str | Path, config: BlipConfig = BlipConfig(),
                      device: str | torch.device = "cpu") -> ImageReward:
    """ImageReward with the weights of `path`, strictly checked, frozen and in eval mode.

    The network is built on the meta device and takes the file's tensors as its parameters, so the
    447M-parameter model is neither randomly initialised first nor held twice in memory.
    """
    with torch.device("meta"):
        model = ImageReward(config)
    state = check_state_dict(model, read_state_dict(path), source=str(path))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


class ImageRewardScorer:
    """Scorer: images [B, 3, H, W] in [0, 1] and B prompts -> normalised ImageReward [B], differentiable
    with respect to the images (parameters frozen).

    Paths default to the staged weights (evaluators.networks.weights keys "imagereward", "imagereward_med",
    "bert_vocab"); `model` / `tokenizer` may be given instead (tests, or a model already loaded).
    """

    name = "imagereward"

    def __init__(self, path: str | Path | None = None, med_config: str | Path | None = None,
                 vocab: str | Path | None = None, device: str | torch.device = "cpu",
                 model: ImageReward | None = None, tokenizer: BertTokenizer | None = None):
        if model is None:
            config = BlipConfig.from_med_config(resolve("imagereward_med", med_config))
            model = load_image_reward(resolve("imagereward", path), config)
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve("bert_vocab", vocab))
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text encoder only "
                             f"{model.config.vocab_size}: wrong vocab.txt?")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, L], attention_mask [B, L]) on the scorer's device, L = 35."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=MAX_TEXT_LEN, return_tensors="pt")
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"need one prompt per image: {images.shape[0]} images")
        pixels = preprocess(images.to(self.device), self.model.config.image_size)
        pixels = pixels.to(self.model.blip.visual_encoder.pos_embed.dtype)
        input_ids, attention_mask = self.tokenize(prompts)
        return self.model(pixels, input_ids, attention_mask)
