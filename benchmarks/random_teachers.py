"""Every real teacher family with RANDOM weights, built directly on a device: no files, no downloads.

The published weights cannot be fetched offline, so the GPU suite measures steps of randomly
initialised networks of the published architectures. Time, memory and FLOPs of a step depend on the
architecture and the batch, not on the weight values, so the figures carry over; losses and images do
not mean anything.

``build(family, size, device)`` -> ``Bench`` (teacher, data, rewards, preset). ``size`` is
``"full"`` (the published configurations: teachers.md §2-§6, Table 5) or ``"smoke"`` (tiny networks
of the same classes, for running the whole suite on a CPU in seconds). The teachers are the
project's adapters (softdimo.teachers.*) around the same network classes their loaders build, so the
step that runs is the trainer's own. Text teachers get ``RandomText``: per-prompt random text
states of the text encoder's shapes (the encoder itself is not part of a training step: conditions
are encoded once per batch under no_grad). Rewards (ImageReward + CLIP score, the presets' terms)
are the evaluators' scorers around random networks of the published sizes (BLIP ViT-L/16 + BERT-base;
open_clip ViT-g-14).
"""
from __future__ import annotations

import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("maskgit", "maskbit", "maskgen", "meissonic", "amused_512")
PRESETS = {"maskgit": "maskgit.yaml", "maskbit": "maskbit.yaml", "maskgen": "maskgen_l.yaml",
           "meissonic": "meissonic.yaml", "amused_512": "amused_512.yaml"}
# Table 5's (global) batch over its 4 H100s; aMUSEd is not in Table 5 and takes Meissonic's column
TABLE5_BATCH = {"maskgit": 256, "maskbit": 256, "maskgen": 64, "meissonic": 16, "amused_512": 16}
TABLE5_GPUS = 4
# blocks of the published networks (the presets' gan.layers index them)
FULL_DEPTH = {"maskgit": 24, "maskbit": 24, "maskgen": 16, "meissonic": 42, "amused_512": 22}
SMOKE_DEPTH = 6                    # blocks of the smoke networks: room for Table 5's 4 and 6 GAN heads
NOTE = ("RANDOM weights (no published weights are reachable offline): time, memory and FLOPs are "
        "those of the published architectures; losses and images mean nothing")


def smoke_layers(layers: Sequence[int], full_depth: int) -> list[int]:
    """The preset's GAN head layers (indices into ``full_depth`` blocks) moved to the same relative
    depths of the SMOKE_DEPTH-block smoke networks, so the smoke step has as many heads."""
    return [round((i % full_depth) * (SMOKE_DEPTH - 1) / (full_depth - 1)) for i in layers]


def per_gpu_batch(family: str) -> int:
    """Table 5's batch over its 4 GPUs: the per-GPU batch each family's step is measured at."""
    return TABLE5_BATCH[family] // TABLE5_GPUS


@dataclass
class Bench:
    family: str
    size: str
    teacher: Any                       # a softdimo.teachers adapter (Teacher protocol)
    rewards: dict                      # reward name -> Scorer (images [B,3,H,W], prompts) -> [B]
    preset: Path
    params: int                        # teacher backbone parameters

    @property
    def full_depth(self) -> int:
        return FULL_DEPTH[self.family]


class RandomText:
    """prompts -> random text-encoder outputs of fixed trailing shapes, the same for the same prompt.

    ``shapes``: one trailing shape per returned tensor (e.g. ((77, 768), (768,)) for CLIP-L's
    penultimate states and pooled embedding). Seeded by a CRC of the prompt, not by the global RNG.
    """

    def __init__(self, shapes: Sequence[tuple], device: torch.device | str):
        self.shapes, self.device = [tuple(s) for s in shapes], torch.device(device)

    def __call__(self, prompts: Sequence[str]) -> tuple:
        out = [[] for _ in self.shapes]
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            for i, shape in enumerate(self.shapes):
                out[i].append(torch.randn(shape, generator=g))
        return tuple(torch.stack(t).to(self.device) for t in out)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ the five families
def _maskgit(size: str, device) -> Any:
    from softdimo.teachers.maskgit import MaskGitTeacher
    from softdimo.teachers.maskgit_modules import MaskTransformer, VQGANDecoder

    if size == "full":   # v1.0 "base" transformer (174 M) + taming VQGAN f16, 1024 x 256 codes
        net = dict(img_size=256, hidden_dim=768, codebook_size=1024, f_factor=16, depth=24, heads=16,
                   mlp_dim=3072, dropout=0.1, nclass=1000)
        vq = (1024, 256, dict(z_channels=256, resolution=256, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
                              num_res_blocks=2, attn_resolutions=[16], dropout=0.0))
    else:
        net = dict(img_size=8, hidden_dim=32, codebook_size=16, f_factor=4, depth=SMOKE_DEPTH, heads=2,
                   mlp_dim=64, dropout=0.1, nclass=10)
        vq = (16, 8, dict(z_channels=8, resolution=16, out_ch=3, ch=32, ch_mult=[1, 2],
                          num_res_blocks=1, attn_resolutions=[8], dropout=0.0))
    return MaskGitTeacher(MaskTransformer(**net), VQGANDecoder(*vq))


def _maskbit(size: str, device) -> Any:
    from softdimo.teachers.maskbit import MaskBitTeacher
    from softdimo.teachers.maskbit_modules import LFQBert
    from softdimo.teachers.maskbit_vqgan import ConvVQConfig, ConvVQModel

    if size == "full":   # maskbit_generator_14bit.yaml / maskbit_tokenizer_14bit.yaml
        bits, levels = 14, 5
        net = dict(img_size=256, hidden_dim=1024, depth=24, heads=16, mlp_dim=4096, dropout=0.1)
        tok = dict(hidden_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2)
    else:
        bits, levels = 6, 3
        net = dict(img_size=16, hidden_dim=32, depth=SMOKE_DEPTH, heads=2, mlp_dim=64, dropout=0.1)
        tok = dict(hidden_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1)
    backbone = LFQBert(codebook_size=2 ** bits, codebook_splits=2, nclass=1000,
                       input_stride=2 ** (levels - 1), use_prenorm=False, **net)
    tokenizer = ConvVQModel(ConvVQConfig(token_size=bits, num_resolutions=levels, **tok))
    sampler = {"steps": 64, "cfg": 7.1, "temperature": 1.0, "randomize": 7.8, "schedule": "arccos",
               "annealing": "cosine", "scale_pow": 3.0, "temperature_annealing": False}
    image = net["img_size"]
    return MaskBitTeacher(backbone, tokenizer, image, sampler)


def _maskgen(size: str, device) -> Any:
    from softdimo.teachers.maskgen import MaskGenTeacher
    from softdimo.teachers.maskgen_modules import MaskGenConfig, MaskGenVQ
    from softdimo.teachers.maskgen_tatitok import TATiTokConfig, TATiTokDecoderSide

    if size == "full":   # MaskGen-L (1024 wide, 16 blocks) + TA-TiTok bl128 VQ (decoder "large")
        gen, tok = MaskGenConfig(), TATiTokConfig()
    else:
        gen = MaskGenConfig(codebook_size=16, seq_len=8, width=32, depth=SMOKE_DEPTH, heads=2, text_embed_dim=24,
                            micro_condition_embed_dim=8, condition_num_classes=1)
        tok = TATiTokConfig(codebook_size=16, token_size=12, num_latent_tokens=8, dec_size="small",
                            crop_size=32, text_embed_dim=24, text_context_length=5)
    backbone = MaskGenVQ(gen)
    with torch.no_grad():    # upstream zero-initialises the adaptive norms: give them values
        for p in backbone.parameters():
            if not p.is_meta and not p.abs().sum():
                p.normal_(0.0, 0.02)
    c, t = tok.text_embed_dim, tok.text_context_length
    text = RandomText(((t, c), (t, c), (c,)), device)       # penultimate, final, pooled (CLIP-L/14-336)
    return MaskGenTeacher(backbone, TATiTokDecoderSide(tok), text)


def _meissonic(size: str, device) -> Any:
    from diffusers import VQModel

    from softdimo.teachers.meissonic import MeissonicTeacher
    from softdimo.teachers.meissonic_modules import MeissonicConfig, Transformer2DModel

    if size == "full":   # MeissonFlow/Meissonic transformer/config.json; vqvae as aMUSEd's, f16
        net = MeissonicConfig(num_layers=14, num_single_layers=28, attention_head_dim=128,
                              num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=1024,
                              axes_dims_rope=(16, 56, 56), downsample=True, upsample=True)
        vq, resolution = _muse_vq("full", 8192), 1024
    else:
        net = MeissonicConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                              axes_dims_rope=(4, 6, 6), vocab_size=17, codebook_size=16,
                              downsample=True, upsample=True)
        vq, resolution = _muse_vq("smoke", 16), 16
    text = RandomText(((77 if size == "full" else 7, net.joint_attention_dim), (net.pooled_projection_dim,)),
                      device)                                # CLIP-H/14 hidden[-2], text_embeds
    return MeissonicTeacher(Transformer2DModel(net), VQModel(**vq), text, resolution=resolution)


def _muse_vq(size: str, codes: int) -> dict:
    """diffusers VQModel kwargs: amused/amused-512 vqvae (also Meissonic's), or a tiny 2x one."""
    if size == "full":
        return dict(act_fn="silu", block_out_channels=[128, 256, 256, 512, 768],
                    down_block_types=["DownEncoderBlock2D"] * 5, up_block_types=["UpDecoderBlock2D"] * 5,
                    in_channels=3, out_channels=3, latent_channels=64, layers_per_block=2,
                    norm_num_groups=32, num_vq_embeddings=codes, sample_size=32,
                    mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True)
    return dict(act_fn="silu", block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, in_channels=3, out_channels=3, latent_channels=8,
                layers_per_block=1, norm_num_groups=8, num_vq_embeddings=codes, sample_size=16,
                mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True)


def _amused_512(size: str, device) -> Any:
    from diffusers import UVit2DModel, VQModel

    from softdimo.teachers.amused import AmusedTeacher

    if size == "full":   # amused/amused-512 transformer/config.json (about 604 M parameters)
        net = dict(hidden_size=1024, use_bias=False, hidden_dropout=0.0, cond_embed_dim=768,
                   micro_cond_encode_dim=256, micro_cond_embed_dim=1280, encoder_hidden_size=768,
                   vocab_size=8256, codebook_size=8192, in_channels=768, block_out_channels=768,
                   num_res_blocks=3, downsample=True, upsample=True, block_num_heads=12,
                   num_hidden_layers=22, num_attention_heads=16, attention_dropout=0.0,
                   intermediate_size=2816, layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=32)
        vq, text = _muse_vq("full", 8192), ((77, 768), (768,))
    else:
        net = dict(hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8,
                   micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=32,
                   codebook_size=8, in_channels=8, block_out_channels=8, num_res_blocks=1, downsample=True,
                   upsample=True, block_num_heads=1, num_hidden_layers=2, num_attention_heads=1,
                   attention_dropout=0.0, intermediate_size=8, layer_norm_eps=1e-6,
                   ln_elementwise_affine=True, sample_size=4)
        vq, text = _muse_vq("smoke", 8), ((7, 8), (8,))
    return AmusedTeacher(UVit2DModel(**net), VQModel(**vq), net["vocab_size"] - 1, RandomText(text, device))


_BUILDERS: dict[str, Callable] = {"maskgit": _maskgit, "maskbit": _maskbit, "maskgen": _maskgen,
                                  "meissonic": _meissonic, "amused_512": _amused_512}


# ------------------------------------------------------------------ rewards
_SMOKE_CLIP = "softdimo-bench-tiny-clip"
_SMOKE_CLIP_CFG = {"embed_dim": 16,
                   "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 2},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "prompt", "cat", "red",
          *[str(i) for i in range(10)]]


def random_scorers(names: Sequence[str], size: str, device) -> dict:
    """Scorers for the reward ``names`` ("imagereward", "clip") around random networks."""
    import json

    from evaluators.networks.blip import BlipConfig
    from evaluators.networks.clip_scores import ClipScorer, _build_open_clip
    from evaluators.networks.image_reward import ImageReward, ImageRewardScorer, load_tokenizer

    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="softdimo_bench_"))
    for name in names:
        if name == "imagereward":
            vocab = tmp / "vocab.txt"
            vocab.write_text("\n".join(_WORDS) + "\n")
            config = BlipConfig() if size == "full" else BlipConfig(
                image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                text_width=24, text_layers=2, text_heads=4, text_intermediate=48,
                vocab_size=len(_WORDS) + 2, max_positions=40, embed_dim=8)
            with torch.device(device):
                model = ImageReward(config)
            out[name] = ImageRewardScorer(model=model, tokenizer=load_tokenizer(vocab), device=device)
        elif name == "clip":
            model_name = "ViT-g-14"
            if size != "full":
                import open_clip
                cfg = tmp / f"{_SMOKE_CLIP}.json"
                cfg.write_text(json.dumps(_SMOKE_CLIP_CFG))
                open_clip.add_model_config(cfg)
                model_name = _SMOKE_CLIP
            out[name] = ClipScorer.from_model(_build_open_clip(model_name, None, device))
        else:
            raise ValueError(f"no random stand-in for reward {name!r} (the presets use imagereward, clip)")
    return out


def build(family: str, size: str = "full", device: torch.device | str = "cpu",
          rewards: Sequence[str] = ()) -> Bench:
    """The family's teacher (and reward scorers) with random weights, initialised on ``device``."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if size not in ("full", "smoke"):
        raise ValueError(f"size must be full or smoke, got {size!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):        # random init on the GPU itself: seconds instead of minutes
        teacher = _BUILDERS[family](size, device)
    if hasattr(teacher, "to"):        # buffers made outside the modules (e.g. MaskBit's bit table)
        teacher.to(device)
    return Bench(family=family, size=size, teacher=teacher,
                 rewards=random_scorers(rewards, size, device) if rewards else {},
                 preset=ROOT / "sweeps" / "presets" / PRESETS[family], params=_count(teacher.backbone))
