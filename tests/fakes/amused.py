"""A tiny random aMUSEd diffusers folder in the published layout (amused/amused-256, -512).

<folder>/amused/ holds model_index.json, transformer/ and vqvae/ (config.json +
diffusion_pytorch_model.safetensors, written by diffusers' own save_pretrained), scheduler/
(scheduler_config.json), text_encoder/ (config.json + model.safetensors) and tokenizer/ (vocab.json,
merges.txt, tokenizer_config.json, special_tokens_map.json, all written here: no hub). The networks
use the tiny configs of diffusers' tests/pipelines/amused/test_amused.py (teachers.md §6.5) with a
4×4 token grid. <folder>/text_features.safetensors holds the same text encoder's conditions for
PROMPTS.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fakes import clip_text

PROMPTS = ("", "a red circle", "a photo of a cat")
MASK_ID = 31
GRID = 4
MERGES = ("a t</w>", "c a", "ca t</w>", "r e", "re d</w>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, shifted = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def write_tokenizer(folder: Path) -> None:
    """A tiny CLIP BPE tokenizer folder: the byte alphabet (plain and word-final), a few merges,
    and the two specials last so that <|endoftext|> has the largest id (CLIP pools at argmax id)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    clip_text.write_tokenizer(folder, tokens + [clip_text.START, clip_text.END], MERGES)


def build(downsample: bool = True):
    """(UVit2DModel, VQModel, CLIPTextModelWithProjection), tiny and random (global RNG)."""
    from diffusers import UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=32, codebook_size=8, in_channels=8,
        block_out_channels=8, num_res_blocks=1, downsample=downsample, upsample=downsample,
        block_num_heads=1, num_hidden_layers=2, num_attention_heads=1, attention_dropout=0.0,
        intermediate_size=8, layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=GRID)
    vqvae = VQModel(
        act_fn="silu", block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"], in_channels=3, out_channels=3, latent_channels=8,
        layers_per_block=1, norm_num_groups=8, num_vq_embeddings=8, sample_size=8,
        mid_block_add_attention=False, lookup_from_codebook=True)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1,
        vocab_size=1000, projection_dim=8, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    with torch.no_grad():
        # untrained weights give near-uniform logits; larger ones make CFG and sampling visible
        for p in transformer.parameters():
            p.mul_(3.0)
        # VQModel's codebook starts at ±1/8; spread it so that codes decode to different images
        vqvae.quantize.embedding.weight.normal_()
    return transformer.eval(), vqvae.eval(), text.eval()


def write(folder: Path, *, downsample: bool = True, text_features: bool = False,
          seed: int = 0) -> tuple[dict, dict]:
    """Write the fake folder under ``folder``; returns (teacher.paths, teacher.options).

    downsample=True is the amused-512 shape (the transformer sees a 2×2 grid), False amused-256.
    text_features=True adds ``teacher.paths.text_features`` (then the text encoder is not loaded).
    """
    from diffusers import AmusedScheduler

    from softdimo.teachers.clip_text import ClipTextEncoder
    from softdimo.teachers.muse_common import pack_text
    from softdimo.teachers.text_features import save_text_features

    root = Path(folder) / "amused"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer, vqvae, text = build(downsample)
    transformer.save_pretrained(str(root / "transformer"))
    vqvae.save_pretrained(str(root / "vqvae"))
    AmusedScheduler(mask_token_id=MASK_ID).save_pretrained(str(root / "scheduler"))
    text.save_pretrained(str(root / "text_encoder"))
    write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "AmusedPipeline", "_diffusers_version": "0.25.0.dev0",
        "scheduler": ["diffusers", "AmusedScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "UVit2DModel"], "vqvae": ["diffusers", "VQModel"]}, indent=2))

    features = Path(folder) / "text_features.safetensors"
    encoder = ClipTextEncoder.from_folders(root / "text_encoder", root / "tokenizer")
    save_text_features(features, list(PROMPTS), pack_text(*encoder(list(PROMPTS))))
    paths = {"folder": root}
    if text_features:
        paths["text_features"] = features
    return paths, {}
