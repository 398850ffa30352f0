"""Teacher adapters: each masked-diffusion teacher behind the protocol in ``protocol.py``.

``FAMILIES`` is the one registry of real teacher families: the adapter module, whether it is
class- or text-conditioned, and the local files (``teacher.paths`` in a config) it loads. Each
adapter module offers ``load(paths, options, device) -> Teacher``; this file imports none of them
until asked (diffusers, open_clip and the vendored networks load only for the family in use).
The embedded world's teachers (``world_c2i``, ``world_t2i``) come from ``softdimo.world`` instead.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

WORLD_KINDS = ("world_c2i", "world_t2i")


@dataclass(frozen=True)
class PathSpec:
    kind: str                   # "file" or "dir"
    what: str                   # what the user puts there (and where it comes from)
    required: bool = True


@dataclass(frozen=True)
class Family:
    module: str                 # the adapter module, with load(paths, options, device)
    conditioning: str           # "class" | "text"
    paths: dict = field(default_factory=dict)    # teacher.paths key -> PathSpec


# text families may take precomputed condition tensors instead of a text encoder
_TEXT_FEATURES = PathSpec("file", "precomputed text conditions (softdimo.teachers.text_features "
                          "format); replaces the text encoder", required=False)

FAMILIES: dict[str, Family] = {
    "amused": Family("softdimo.teachers.amused", "text", {
        "folder": PathSpec("dir", "the aMUSEd diffusers folder (amused/amused-256 or amused-512): "
                                  "transformer/, vqvae/, text_encoder/, tokenizer/"),
        "text_features": _TEXT_FEATURES}),
    "maskgit": Family("softdimo.teachers.maskgit", "class", {
        "transformer": PathSpec("file", "MaskGIT_ImageNet_256.pth (llvictorll/Maskgit-pytorch, "
                                        "pretrained_maskgit/MaskGIT/)"),
        "vqgan": PathSpec("file", "the VQGAN last.ckpt (llvictorll/Maskgit-pytorch, pretrained_maskgit/VQGAN/)"),
        "vqgan_config": PathSpec("file", "the VQGAN model.yaml (same folder)")}),
    "maskbit": Family("softdimo.teachers.maskbit", "class", {
        "generator": PathSpec("file", "maskbit_generator_14bit.bin (markweber/maskbit_generator_14bit)"),
        "generator_config": PathSpec("file", "maskbit_generator_14bit.yaml (markweberdev/maskbit configs/generator/)"),
        "tokenizer": PathSpec("file", "maskbit_tokenizer_14bit.bin (markweber/maskbit_tokenizer_14bit)"),
        "tokenizer_config": PathSpec("file", "maskbit_tokenizer_14bit.yaml (markweberdev/maskbit configs/tokenizer/)")}),
    "maskgen": Family("softdimo.teachers.maskgen", "text", {
        "generator": PathSpec("dir", "the MaskGen-VQ-L folder with config.json + model.safetensors "
                                     "(turkeyju/generator_maskgen_vq_l)"),
        "tokenizer": PathSpec("dir", "the TA-TiTok bl128 VQ folder with config.json + model.safetensors "
                                     "(turkeyju/tokenizer_tatitok_bl128_vq)"),
        "text_encoder": PathSpec("file", "open_clip ViT-L-14-336 (openai) weights, "
                                         "open_clip_pytorch_model.bin", required=False),
        "text_features": _TEXT_FEATURES}),
    "meissonic": Family("softdimo.teachers.meissonic", "text", {
        "folder": PathSpec("dir", "the Meissonic diffusers folder (MeissonFlow/Meissonic): "
                                  "transformer/, vqvae/, text_encoder/, tokenizer/"),
        "text_features": _TEXT_FEATURES}),
}
TEACHER_KINDS = WORLD_KINDS + tuple(FAMILIES)


class TeacherFilesMissing(FileNotFoundError):
    """A teacher file named in the config is absent; ``key`` is its dotted config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class TeacherOptionError(ValueError):
    """An unknown or bad ``teacher.options`` entry; ``key`` is its dotted config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def check_paths(kind: str, paths: Mapping[str, str]) -> dict[str, Path]:
    """The family's files as Paths, checked to exist; raises TeacherFilesMissing naming the key."""
    family = FAMILIES[kind]
    for name in paths:
        if name not in family.paths:
            raise TeacherFilesMissing(f"teacher.paths.{name}", f"not a file of {kind}; expected "
                                      f"{', '.join(family.paths)}")
    out = {}
    for name, spec in family.paths.items():
        value = paths.get(name)
        if not value:
            if spec.required:
                raise TeacherFilesMissing(f"teacher.paths.{name}", f"missing: set it to {spec.what}")
            continue
        path = Path(value).expanduser()
        exists = path.is_dir() if spec.kind == "dir" else path.is_file()
        if not exists:
            raise TeacherFilesMissing(f"teacher.paths.{name}", f"{path} is not an existing "
                                      f"{'folder' if spec.kind == 'dir' else 'file'} ({spec.what})")
        out[name] = path
    return out


def load_teacher(kind: str, paths: Mapping[str, str], options: Mapping[str, Any], device) -> Any:
    """The adapter for ``kind`` with its weights loaded from ``paths`` (checked first)."""
    checked = check_paths(kind, paths)
    module = importlib.import_module(FAMILIES[kind].module)
    return module.load(checked, dict(options), device)
