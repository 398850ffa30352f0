"""CLIP-family scorers: CLIP score (ViT-g-14), HPSv2 / HPSv2.1 (ViT-H-14) and PickScore.

Each scorer maps images [B, 3, H, W] float in [0, 1] and B prompts to B scores, differentiably in
the images, so the same object is an evaluation metric and a training reward. Networks are built
from code and loaded from local files found by ``evaluators.networks.weights.resolve`` (never a hub id);
parameters are frozen and text embeddings are cached per prompt.

The PIL steps of the reference pipelines are replaced by tensor operations:
- bicubic resizes use ``F.interpolate(mode="bicubic", antialias=True)``, PIL's own kernel
  (a = -0.5, widened when shrinking): at most 3e-3/255 from PIL's float ("F") mode (measured);
- LANCZOS (the CLIP-score protocol's resize to 256) is PIL's float algorithm written as two
  matrices: at most 1e-4/255 from PIL's "F" mode (measured, float32 rounding);
- PIL resizes uint8 images: it rounds (and clips) after each resize and between its horizontal
  and vertical passes. The rounding is not reproduced (it would stop gradients), only the final
  clipping to [0, 1]. Against PIL on uint8 this leaves a mean |difference| of about 0.3/255; where
  PIL's first pass overshoots [0, 255] (noise, hard edges, upsampling) single pixels differ more.

Shapes: B batch, E joint embedding width, T text context length.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from evaluators.networks.weights import StateDictMismatch, load_strict, resolve

# OpenAI CLIP's normalisation: open_clip's ViT-g-14/ViT-H-14 default and PickScore's processor
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROTOCOL_PREFIX = "A photo depicts"     # GigaGAN/DMD CLIP-score text prefix
PROTOCOL_SIZE = 256                     # GigaGAN/DMD CLIP-score LANCZOS size, before CLIP's
HPS_KEYS = {"v2.0": "hps_v2", "v2.1": "hps_v21"}


# ---------------------------------------------------------------- tensor preprocessing

def bicubic_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, h, w], PIL-style antialiased bicubic, clipped to [0, 1] like uint8."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images   # PIL returns a copy at the same size
    out = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1)


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    # PIL's truncated sinc: sinc(x) sinc(x/3) on [-3, 3)
    return torch.where((x >= -3) & (x < 3), torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(x))


@lru_cache(maxsize=32)
def _lanczos_matrix(in_size: int, out_size: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """[out, in] resampling weights, PIL's ``precompute_coeffs`` for LANCZOS (support 3), computed
    in float64 and cached per device and dtype (no host-to-device copy per training step)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)        # shrinking widens the kernel: the antialiasing
    radius = 3.0 * filterscale
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    lo = torch.trunc(center - radius + 0.5).clamp(min=0)
    hi = torch.trunc(center + radius + 0.5).clamp(max=in_size)
    x = torch.arange(in_size, dtype=torch.float64)
    inside = (x[None] >= lo[:, None]) & (x[None] < hi[:, None])
    w = _lanczos((x[None] - center[:, None] + 0.5) / filterscale) * inside
    return (w / w.sum(dim=1, keepdim=True)).to(device=device, dtype=dtype)


def lanczos_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, h, w] with PIL's LANCZOS in float, clipped to [0, 1] like uint8."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    wh = _lanczos_matrix(images.shape[-2], size[0], images.device, images.dtype)
    ww = _lanczos_matrix(images.shape[-1], size[1], images.device, images.dtype)
    return torch.einsum("oh,bchw,pw->bcop", wh, images, ww).clamp(0, 1)


def resize_shortest(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side -> ``size`` (torchvision's rule: long = int(size * long / short)), bicubic."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    return bicubic_resize(images, (size, new_long) if h <= w else (new_long, size))


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Central size x size window, offsets rounded as torchvision's ``center_crop``."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def resize_max_side_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPS's ResizeMaxSize: longest side -> ``size`` (bicubic), pad to size x size with ``fill``.

    Heights/widths are ``round(dim * scale)``, padding is split floor-first, as in HPS. HPS skips
    the pad when the longest side is already ``size``; here the output is always square.
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = bicubic_resize(images, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float] = MEAN,
              std: Sequence[float] = STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - m) / s


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = MEAN,
                    std: Sequence[float] = STD) -> torch.Tensor:
    """CLIP's val transform on tensors: shortest side -> size (bicubic), centre crop, normalise."""
    return normalize(center_crop(resize_shortest(images, size), size), mean, std)


def protocol_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = MEAN,
                        std: Sequence[float] = STD) -> torch.Tensor:
    """The GigaGAN/DMD CLIP-score image path: centre crop to a square (the short side), LANCZOS
    to 256, then CLIP's val transform (bicubic to ``size``, centre crop, normalise)."""
    side = min(images.shape[-2:])
    square = center_crop(images, side)
    return clip_preprocess(lanczos_resize(square, (PROTOCOL_SIZE, PROTOCOL_SIZE)), size, mean, std)


# ---------------------------------------------------------------- text

def protocol_tokens(tokenizer, prompts: Sequence[str], context_length: int) -> torch.Tensor:
    """GigaGAN/DMD CLIP-score tokens [B, T]: SOT, "a photo depicts", the prompt, EOT, zeros.

    Rows longer than T are truncated and their last column forced to EOT (the text tower pools at
    the EOT position). ``tokenizer`` is open_clip's SimpleTokenizer (OpenAI CLIP's BPE).
    """
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    prefix = tokenizer.encode(PROTOCOL_PREFIX)
    out = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = ([sot] + prefix + tokenizer.encode(prompt) + [eot])[:context_length]
        ids[-1] = eot
        out[row, :len(ids)] = torch.tensor(ids)
    return out


class TextCache:
    """prompt -> normalised text embedding [E] (float32), computed once with ``encode``."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode = encode
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings [B, E] of prompts, in order; encodes only the new ones."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if missing:
            # outside inference mode even when called inside it: a cache filled during an
            # inference_mode evaluation must stay usable when the scorer later gives a reward
            with torch.inference_mode(False), torch.no_grad():
                emb = F.normalize(self.encode(missing).float(), dim=-1)
            self.store.update(zip(missing, emb))
        return torch.stack([self.store[p] for p in prompts])


# ---------------------------------------------------------------- shared plumbing

def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    # frozen scorer: gradients flow through it to the images, never into it
    return model.eval().requires_grad_(False)


def _prepared(images: torch.Tensor, model: torch.nn.Module,
              preprocess: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Preprocess on the model's device in float32, autocast off (a bf16 resize would cost about
    1/255), then cast to the model's dtype."""
    p = next(model.parameters())
    with torch.autocast(device_type=p.device.type, enabled=False):
        x = preprocess(images.to(device=p.device, dtype=torch.float32))
    return x.to(p.dtype)


def _build_open_clip(name: str, pretrained: str | None, device: str | torch.device):
    """open_clip ``create_model`` with a local file (or none), initialised on ``device`` directly
    (random init of a 1B-parameter net on CPU before moving it costs tens of seconds)."""
    import open_clip
    with torch.device(device):
        return open_clip.create_model(name, pretrained=pretrained, device=device)


def _open_clip_norm(model: torch.nn.Module) -> tuple[int, Sequence[float], Sequence[float]]:
    from open_clip import get_model_preprocess_cfg
    cfg = get_model_preprocess_cfg(model) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), cfg.get("mean", MEAN), cfg.get("std", STD)


class _OpenClipScorer:
    """Cosine of normalised open_clip image and (cached) text embeddings; subclasses choose the
    tokenisation and the image preprocessing."""
    name = ""

    def _setup(self, model: torch.nn.Module) -> None:
        from open_clip import SimpleTokenizer
        self.model = _freeze(model)
        self.size, self.mean, self.std = _open_clip_norm(model)
        self.context_length = int(model.context_length)
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.text = TextCache(self._encode_text)

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts))

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokens(prompts).to(device))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised float32 embeddings [B, E]."""
        x = _prepared(images, self.model, self.preprocess)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> scores [B] (float32), differentiable."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeddings(images)
        return (img * self.text(prompts).to(img.device)).sum(dim=-1)


class ClipScorer(_OpenClipScorer):
    """CLIP score by the GigaGAN/DMD/DiMO protocol with open_clip ViT-g-14 laion2b_s12b_b42k.

    score = cos(image embedding, text embedding), not x100, not clipped. Text: "A photo depicts "
    spliced after SOT, truncated to 77 tokens with EOT forced last (``protocol_tokens``).
    Images: the protocol's PIL pipeline on tensors (``protocol_preprocess``); exactness:
    - centre crop to a square: exact;
    - LANCZOS to 256 (skipped at 256, as PIL does): PIL's LANCZOS weights exactly, applied in
      float. Approximation: PIL resizes the uint8 image and rounds/clips after its horizontal
      pass and after the vertical pass; only the final clip is done here (mean |difference|
      about 0.3/255; more on single pixels where PIL's first pass overshoots). The upstream PNG
      round trip of generated images is not done either: pass ``(x * 255).round() / 255`` for
      that;
    - bicubic to 224 + centre crop: torch antialiased bicubic (PIL's kernel, <= 3e-3/255 from
      PIL in float); the same uint8 rounding is skipped;
    - normalisation: exact (OpenAI mean/std, the tag's values).
    """
    name = "clip"

    def __init__(self, path: str | Path | None = None, model: str = "ViT-g-14",
                 device: str | torch.device = "cpu"):
        if path is None and model != "ViT-g-14":
            raise ValueError(f"pass the weights file of {model}: $SOFTDIMO_WEIGHTS holds ViT-g-14")
        file = resolve("clip_g14", path)
        self._setup(_build_open_clip(model, str(file), device))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ClipScorer:
        """A scorer around an already-built open_clip CLIP (tests use tiny configs)."""
        scorer = cls.__new__(cls)
        scorer._setup(model)
        return scorer

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return protocol_tokens(self.tokenizer, prompts, self.context_length)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return protocol_preprocess(images, self.size, self.mean, self.std)


def load_hps_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load an HPS checkpoint (``{"state_dict": ...}``; 686 keys for ViT-H-14), strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise StateDictMismatch(f"{path}: expected a dict with a 'state_dict' entry (HPS format)")
    load_strict(model, checkpoint["state_dict"], str(path))


class HpsScorer(_OpenClipScorer):
    """HPSv2 / HPSv2.1: diagonal of normalised image @ text features of the HPS-tuned ViT-H-14
    (no logit scale; typical 0.24-0.34). Images: HPS's ResizeMaxSize (longest side -> 224 bicubic,
    zero pad to a square; ``resize_max_side_pad``) and OpenAI mean/std; text: open_clip's
    tokenizer (77 tokens)."""

    def __init__(self, path: str | Path | None = None, version: str = "v2.1",
                 device: str | torch.device = "cpu", model: str = "ViT-H-14"):
        if version not in HPS_KEYS:
            raise ValueError(f"unknown HPS version {version!r}; choose from {sorted(HPS_KEYS)}")
        file = resolve(HPS_KEYS[version], path)
        net = _build_open_clip(model, None, device)
        load_hps_checkpoint(net, file)
        self._setup(net, version)

    @classmethod
    def from_model(cls, model: torch.nn.Module, version: str = "v2.1") -> HpsScorer:
        scorer = cls.__new__(cls)
        scorer._setup(model, version)
        return scorer

    def _setup(self, model: torch.nn.Module, version: str = "v2.1") -> None:
        super()._setup(model)
        self.version = version
        self.name = "hps" if version == "v2.0" else "hps_v21"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize_max_side_pad(images, self.size), self.mean, self.std)


def _processor_settings(folder: Path,
                        default_size: int) -> tuple[int, Sequence[float], Sequence[float]]:
    """(crop size, mean, std) from a processor folder's preprocessor_config.json, if present."""
    file = folder / "preprocessor_config.json"
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    size = cfg.get("crop_size", default_size)
    size = size.get("height", default_size) if isinstance(size, dict) else size
    return int(size), cfg.get("image_mean", MEAN), cfg.get("image_std", STD)


class PickScorer:
    """PickScore: logit_scale.exp() * cos(image, text) of the PickScore_v1 CLIPModel (~20-23).

    Images: the processor's resize (shortest side 224, bicubic) + centre crop + normalise, on
    tensors; text: the processor folder's CLIP tokenizer (padding, truncation to 77).
    """
    name = "pickscore"

    def __init__(self, path: str | Path | None = None, processor: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizerFast
        model_dir, proc_dir = resolve("pickscore", path), resolve("pickscore_proc", processor)
        model, info = CLIPModel.from_pretrained(model_dir, local_files_only=True,
                                                output_loading_info=True)
        # from_pretrained only warns about missing keys (and initialises them randomly)
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            raise StateDictMismatch(f"{model_dir} does not fit CLIPModel: {bad} "
                                    f"{info.get('error_msgs') or ''}".strip())
        tokenizer = CLIPTokenizerFast.from_pretrained(proc_dir, local_files_only=True)
        size, mean, std = _processor_settings(Path(proc_dir), model.config.vision_config.image_size)
        self._setup(model.to(device), tokenizer, size, mean, std)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, size: int | None = None,
                   mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> PickScorer:
        """A scorer around a built transformers CLIPModel and a CLIP tokenizer."""
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, size or model.config.vision_config.image_size, mean, std)
        return scorer

    def _setup(self, model, tokenizer, size: int, mean: Sequence[float],
               std: Sequence[float]) -> None:
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.max_length = min(77, int(model.config.text_config.max_position_embeddings))
        self.text = TextCache(self._encode_text)

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns BaseModelOutputWithPooling (projected embedding in pooler_output),
        # 4.x a tensor
        return out if torch.is_tensor(out) else out.pooler_output

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        return self._pooled(self.model.get_text_features(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.size, self.mean, self.std)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised float32 embeddings [B, E]."""
        x = _prepared(images, self.model, self.preprocess)
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x)).float(),
                           dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> scores [B] (float32), differentiable."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeddings(images)
        cos = (img * self.text(prompts).to(img.device)).sum(dim=-1)
        return self.model.logit_scale.exp().float() * cos
