"""A tiny random Meissonic in the published diffusers folder layout (teachers.md §5.4, §5.5).

``write(folder)`` creates ``folder/Meissonic/`` with transformer/, vqvae/, text_encoder/, tokenizer/,
scheduler/ and model_index.json (the file names and config formats of MeissonFlow/Meissonic), plus
``folder/text_features.safetensors`` with the packed conditions of ``PROMPTS``. Token grid 8×8,
V = 16 codes, mask id 16, 16×16-pixel images, a 2-layer CLIP text model of width 32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from softdimo.teachers.meissonic_modules import MeissonicConfig, Transformer2DModel
from tests.fakes import clip_text

TRANSFORMER = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   guidance_embeds=False, axes_dims_rope=[4, 6, 6], vocab_size=17, codebook_size=16,
                   downsample=True, upsample=True)
VQVAE = dict(act_fn="silu", block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, in_channels=3, out_channels=3, latent_channels=8,
             layers_per_block=1, norm_num_groups=8, num_vq_embeddings=16, sample_size=16,
             mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True)
RESOLUTION = 16                      # 8×8 tokens through the VQ's 2× decoder
MAX_TEXT = 16                        # tokenizer model_max_length (77 in CLIP-H)
PROMPTS = ["", "a red circle", "a photo of a cat"]
TEXT_FEATURES = "text_features.safetensors"


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter off its init (ones, zeros) so that swapped weights would show."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary of single letters (no merges): enough to tell prompts apart."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [clip_text.START, clip_text.END, *letters, *(c + "</w>" for c in letters)]
    clip_text.write_tokenizer(folder, tokens, max_length=MAX_TEXT, do_lower_case=True)


def write_transformer(folder: Path, net: Transformer2DModel) -> None:
    """transformer/config.json + diffusion_pytorch_model.safetensors, as diffusers saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.30.0.dev0",
              **net.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write(folder: Path) -> tuple[dict, dict]:
    """Write the tiny Meissonic under ``folder`` -> (teacher.paths, teacher.options) for ``load``."""
    from diffusers import VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from softdimo.teachers.clip_text import ClipTextEncoder
    from softdimo.teachers.muse_common import pack_text
    from softdimo.teachers.text_features import save_text_features

    folder = Path(folder)
    root = folder / "Meissonic"
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    net = Transformer2DModel(MeissonicConfig.from_dict(TRANSFORMER))
    _perturb(net, generator)
    write_transformer(root / "transformer", net)

    vq = VQModel(**VQVAE)
    _perturb(vq, generator)
    vq.save_pretrained(str(root / "vqvae"), safe_serialization=True)

    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, vocab_size=64,
        projection_dim=32, max_position_embeddings=MAX_TEXT, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    clip.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    _write_tokenizer(root / "tokenizer")

    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "Scheduler", "_diffusers_version": "0.30.0.dev0",
         "mask_token_id": TRANSFORMER["vocab_size"] - 1, "masking_schedule": "cosine"}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "Pipeline", "_diffusers_version": "0.30.0.dev0",
         "scheduler": ["src.scheduler", "Scheduler"], "text_encoder": ["transformers",
         "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "transformer": ["src.transformer", "Transformer2DModel"], "vqvae": ["diffusers", "VQModel"]}))

    encoder = ClipTextEncoder.from_folders(root / "text_encoder", root / "tokenizer")
    save_text_features(folder / TEXT_FEATURES, PROMPTS, pack_text(*encoder(PROMPTS)))
    return {"folder": root}, {"resolution": RESOLUTION}
