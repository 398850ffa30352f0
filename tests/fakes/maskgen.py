"""Tiny random MaskGen-VQ + TA-TiTok folders in the published HubMixin layout (teachers.md §4.5).

<folder>/generator/ and <folder>/tokenizer/ each hold ``config.json`` (the nested upstream config:
experiment, model.vq_model, model.maskgen, dataset.preprocessing) and ``model.safetensors``. The
generator file is written by ``safetensors.torch.save_model``, as PyTorchModelHubMixin does, so the
tied ``lm_head.weight`` is dropped in favour of ``embeddings.weight``. The tokenizer file also holds
the encoder side (``encoder.*`` of a "small" TiTok encoder and ``latent_tokens``, zeros), as a real
TA-TiTok file does. The decoder is "small", the smallest size upstream has (25.6 M parameters), at
crop 32 (a 2×2 patch grid). <folder>/text_features.safetensors holds packed conditions for PROMPTS.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ("", "a red circle", "a photo of a cat", "two blue squares")
V, L, T, C, D = 16, 8, 5, 24, 32          # codes, tokens, text tokens, text width, generator width
TOKEN_SIZE, CROP, PATCH = 12, 32, 16
AESTHETIC = 6.5

VQ_MODEL = {"quantize_mode": "vq", "codebook_size": V, "token_size": TOKEN_SIZE, "use_l2_norm": False,
            "commitment_cost": 0.25, "clustering_vq": False, "vit_enc_model_size": "small",
            "vit_dec_model_size": "small", "vit_enc_patch_size": PATCH, "vit_dec_patch_size": PATCH,
            "num_latent_tokens": L, "finetune_decoder": False, "is_legacy": False,
            "text_embed_dim": C, "text_context_length": T}
MASKGEN = {"decoder_embed_dim": D, "decoder_depth": 2, "decoder_num_heads": 2, "micro_condition": True,
           "micro_condition_embed_dim": 8, "text_drop_prob": 0.1, "condition_num_classes": 1,
           "cfg": 12.0, "num_iter": 16, "temperature": 2.0, "sample_aesthetic_score": AESTHETIC}
DATASET = {"preprocessing": {"crop_size": CROP}}


def generator_config() -> dict:
    return {"experiment": {"tokenizer_checkpoint": "tatitok_bl128_vq.bin",
                           "generator_checkpoint": "maskgen_vq_l.bin"},
            "model": {"vq_model": dict(VQ_MODEL), "maskgen": dict(MASKGEN)}, "dataset": DATASET}


def tokenizer_config() -> dict:
    return {"experiment": {"tokenizer_checkpoint": "tatitok_bl128_vq.bin", "output_dir": "tatitok_bl128_vq"},
            "model": {"vq_model": dict(VQ_MODEL)}, "dataset": DATASET}


def build(seed: int = 0):
    """(MaskGenVQ, TATiTokDecoderSide), tiny and random."""
    from softdimo.teachers.maskgen_modules import MaskGenConfig, MaskGenVQ
    from softdimo.teachers.maskgen_tatitok import TATiTokConfig, TATiTokDecoderSide

    torch.manual_seed(seed)
    generator = MaskGenVQ(MaskGenConfig.from_dict(generator_config()))
    tokenizer = TATiTokDecoderSide(TATiTokConfig.from_dict(tokenizer_config()))
    with torch.no_grad():
        # untrained adaptive norms start at zero upstream; random ones make text and CFG matter
        for p in generator.parameters():
            p.normal_(0.0, 0.3)
        # upstream's codebook starts at ±1/V; spread it so that codes decode to different images
        tokenizer.quantize.embedding.weight.normal_()
    return generator.eval(), tokenizer.eval()


def encoder_tensors(width: int = 512, layers: int = 8, seed: int = 3) -> dict:
    """The encoder side of a "small" TiTok encoder at CROP (names and shapes as upstream), seeded
    random (std 0.05; LayerNorms at 1 and 0) so that different images give different codes."""
    grid = CROP // PATCH
    shapes = {"latent_tokens": (L, width),
              "encoder.patch_embed.weight": (width, 3, PATCH, PATCH), "encoder.patch_embed.bias": (width,),
              "encoder.class_embedding": (1, width), "encoder.positional_embedding": (grid ** 2 + 1, width),
              "encoder.latent_token_positional_embedding": (L, width),
              "encoder.conv_out.weight": (TOKEN_SIZE, width, 1, 1), "encoder.conv_out.bias": (TOKEN_SIZE,)}
    block = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
             "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
             "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
             "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    for i in range(layers):
        shapes.update({f"encoder.transformer.{i}.{k}": s for k, s in block.items()})
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    norms = ["encoder.ln_pre", "encoder.ln_post"] + [f"encoder.transformer.{i}.{n}"
                                                     for i in range(layers) for n in ("ln_1", "ln_2")]
    for name in norms:
        out.update({f"{name}.weight": torch.ones(width), f"{name}.bias": torch.zeros(width)})
    return out


def text_features(seed: int = 1) -> torch.Tensor:
    """Packed conditions [len(PROMPTS), 2T+2, C]: random text states, the aesthetic row = 6.5."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(PROMPTS), 2 * T + 2, C, generator=g)
    feats[:, 2 * T + 1] = 0.0
    feats[:, 2 * T + 1, 0] = AESTHETIC
    return feats


def write(folder: Path) -> tuple[dict, dict]:
    """Write the fake folders; returns (teacher.paths, teacher.options) for load_teacher("maskgen", ...)."""
    from safetensors.torch import save_file, save_model

    from softdimo.teachers.text_features import save_text_features

    folder = Path(folder)
    generator, tokenizer = build()
    gen_dir, tok_dir = folder / "generator", folder / "tokenizer"
    gen_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (gen_dir / "config.json").write_text(json.dumps(generator_config(), indent=4))
    save_model(generator, str(gen_dir / "model.safetensors"))
    (tok_dir / "config.json").write_text(json.dumps(tokenizer_config(), indent=4))
    state = {k: v.contiguous() for k, v in tokenizer.state_dict().items()}
    save_file({**state, **encoder_tensors()}, str(tok_dir / "model.safetensors"), metadata={"format": "pt"})
    save_text_features(folder / "text_features.safetensors", PROMPTS, text_features())
    paths = {"generator": str(gen_dir), "tokenizer": str(tok_dir),
             "text_features": str(folder / "text_features.safetensors")}
    return paths, {}
