"""The single registry of local weight files the evaluators load, and a strict state-dict loader.

No machine this project runs on can download weights, so a person stages them once under a
directory named by ``$SOFTDIMO_WEIGHTS`` (or passes each path explicitly) and every evaluator asks
``resolve(key)`` for its file. A missing file fails fast with one line saying which file, for which
key, and where it comes from; ``expected_files()`` renders the same registry as the README's table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from softdimo.checkpoints import StateDictMismatch, load_strict

__all__ = ["WEIGHTS_ENV", "WEIGHT_FILES", "WeightFile", "WeightsMissing", "StateDictMismatch",
           "resolve", "expected_files", "set_offline_env", "load_strict"]

WEIGHTS_ENV = "SOFTDIMO_WEIGHTS"


@dataclass(frozen=True)
class WeightFile:
    """One staged file or folder: where it lives under $SOFTDIMO_WEIGHTS, what it is, where from.

    A ``path`` ending in "/" is a folder (a Hugging Face model/processor directory); any other path
    is a file. ``alternatives`` are other accepted names for the same weights (e.g. ``.bin`` for
    ``.safetensors``), tried in order after ``path``.
    """
    path: str
    description: str
    source: str
    alternatives: tuple[str, ...] = ()

    @property
    def is_dir(self) -> bool:
        return self.path.endswith("/")


_HF = "https://huggingface.co/"
WEIGHT_FILES: dict[str, WeightFile] = {
    "inception": WeightFile(
        "inception/pt_inception-2015-12-05-6726825d.pth",
        "the FID Inception-v3 (PyTorch port of the TF graph's weights)",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth; torch-fidelity's release v0.2.0 "
        "weights-inception-2015-12-05-6726825d.pth carries the same sha256 prefix"),
    "clean_fid_inception": WeightFile(
        "inception/inception-2015-12-05.pt",
        "clean-fid's Inception (the StyleGAN2-ADA TorchScript port of the TF-2015 graph; fid30k)",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
    "adm_ref": WeightFile(
        "fid/VIRTUAL_imagenet256_labeled.npz",
        "the ADM ImageNet-256 reference batch (mu, sigma, arr_0; about 2 GB)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz"),
    "clip_g14": WeightFile(
        "clip/ViT-g-14-laion2b_s12b_b42k/open_clip_model.safetensors",
        "open_clip ViT-g-14 laion2b_s12b_b42k weights (CLIP score)",
        _HF + "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
        ("clip/ViT-g-14-laion2b_s12b_b42k/open_clip_pytorch_model.bin",
         "clip/ViT-g-14-laion2b_s12b_b42k/open_clip_model.bin")),
    "hps_v2": WeightFile(
        "hps/HPS_v2_compressed.pt", "the HPSv2 checkpoint (open_clip ViT-H-14 state_dict)",
        _HF + "xswu/HPSv2 (HPS_v2_compressed.pt)"),
    "hps_v21": WeightFile(
        "hps/HPS_v2.1_compressed.pt", "the HPSv2.1 checkpoint (open_clip ViT-H-14 state_dict)",
        _HF + "xswu/HPSv2 (HPS_v2.1_compressed.pt)"),
    "pickscore": WeightFile(
        "pickscore/PickScore_v1/",
        "the PickScore_v1 Hugging Face CLIPModel folder (config.json + model.safetensors or "
        "pytorch_model.bin)",
        _HF + "yuvalkirstain/PickScore_v1"),
    "pickscore_proc": WeightFile(
        "pickscore/processor/",
        "the PickScore processor folder (CLIP tokenizer files + preprocessor_config.json)",
        _HF + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "imagereward": WeightFile(
        "imagereward/ImageReward.pt", "the ImageReward checkpoint (BLIP ViT-L + BERT + MLP)",
        _HF + "THUDM/ImageReward (ImageReward.pt)"),
    "imagereward_med": WeightFile(
        "imagereward/med_config.json", "ImageReward's BERT config (med_config.json)",
        _HF + "THUDM/ImageReward (med_config.json)"),
    "bert_vocab": WeightFile(
        "imagereward/bert-base-uncased/vocab.txt", "the bert-base-uncased WordPiece vocabulary",
        _HF + "google-bert/bert-base-uncased (vocab.txt)"),
    "geneval_meta": WeightFile(
        "geneval/evaluation_metadata.jsonl", "GenEval's 553 prompts with their rules",
        "https://github.com/djghosh13/geneval (prompts/evaluation_metadata.jsonl)"),
    "mask2former": WeightFile(
        "geneval/mask2former-swin-small-coco-instance/",
        "the Mask2Former Swin-S COCO-instance Hugging Face folder (GenEval detector)",
        _HF + "facebook/mask2former-swin-small-coco-instance"),
    "clip_l14": WeightFile(
        "geneval/ViT-L-14-openai/open_clip_model.safetensors",
        "open_clip ViT-L-14 OpenAI weights (GenEval colour classifier; needs QuickGELU)",
        _HF + "timm/vit_large_patch14_clip_224.openai",
        ("geneval/ViT-L-14-openai/open_clip_pytorch_model.bin",)),
}


class WeightsMissing(FileNotFoundError):
    """A registered weight file is not where it should be. ``str(e)`` is one line.

    Attributes: ``key`` (the registry key) and ``path`` (the path that was looked for).
    """
    key: str
    path: Path | None


def _entry(key: str) -> WeightFile:
    if key not in WEIGHT_FILES:
        raise KeyError(f"unknown weights key {key!r}; known keys: {', '.join(WEIGHT_FILES)}")
    return WEIGHT_FILES[key]


def _missing(key: str, path: Path | None, reason: str) -> WeightsMissing:
    entry = WEIGHT_FILES[key]
    error = WeightsMissing(
        f"{key}: {reason}; put {entry.description} at ${WEIGHTS_ENV}/{entry.path} "
        f"(from {entry.source}) or pass its path")
    error.key, error.path = key, path
    return error


def _present(path: Path, entry: WeightFile) -> bool:
    return path.is_dir() if entry.is_dir else path.is_file()


def resolve(key: str, explicit: str | Path | None = None) -> Path:
    """The local path of weights ``key``: ``explicit`` if given (it must exist), else the file under
    $SOFTDIMO_WEIGHTS (its registered name, then its alternatives). Raises WeightsMissing."""
    entry = _entry(key)
    kind = "folder" if entry.is_dir else "file"
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not _present(path, entry):
            raise _missing(key, path, f"{path} is not an existing {kind}")
        return path
    root = os.environ.get(WEIGHTS_ENV)
    if not root:
        raise _missing(key, None, f"no path was passed and ${WEIGHTS_ENV} is not set")
    candidates = [Path(root).expanduser() / p for p in (entry.path, *entry.alternatives)]
    for path in candidates:
        if _present(path, entry):
            return path
    raise _missing(key, candidates[0], f"{candidates[0]} not found")


def expected_files() -> str:
    """The registry as a Markdown table (key, path under $SOFTDIMO_WEIGHTS, what, source)."""
    rows = ["| key | path under `$SOFTDIMO_WEIGHTS` | what | source |", "|---|---|---|---|"]
    for key, entry in WEIGHT_FILES.items():
        paths = " or ".join(f"`{p}`" for p in (entry.path, *entry.alternatives))
        rows.append(f"| `{key}` | {paths} | {entry.description} | {entry.source} |")
    return "\n".join(rows)


def set_offline_env() -> None:
    """Forbid Hugging Face downloads in this process (evaluator processes call it first).

    huggingface_hub reads these variables when it is imported, so call this before anything
    imports transformers or open_clip.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
