"""A tiny random MaskBit in the published file layout (teachers.md §3.5).

Published: ``maskbit_generator_14bit.bin`` and ``maskbit_tokenizer_14bit.bin`` (plain torch state
dicts; the generator's input projection stored as ``token_emb.*``, renamed by upstream's loader)
and the OmegaConf yamls ``configs/generator/maskbit_generator_14bit.yaml`` and
``configs/tokenizer/maskbit_tokenizer_14bit.yaml``. The fake keeps the names and the yaml layout
with tiny values: 6 bits = 2 groups of 3 bits (V = 8, mask id 8), a 4×4 latent grid (L = 32),
16-pixel images, hidden_channels 32 (MaskBit's GroupNorm needs multiples of 32).
"""
from __future__ import annotations

from pathlib import Path

import torch

from softdimo.teachers.maskbit_modules import LFQBert
from softdimo.teachers.maskbit_vqgan import ConvVQConfig, ConvVQModel

GENERATOR_FILE = "maskbit_generator_14bit.bin"
TOKENIZER_FILE = "maskbit_tokenizer_14bit.bin"
GENERATOR_YAML = "maskbit_generator_14bit.yaml"
TOKENIZER_YAML = "maskbit_tokenizer_14bit.yaml"

# the network fields shared by both yamls (published: 14 bits, 128 channels, [1,1,2,2,4], 5 levels)
_VQ_MODEL = """\
    vq_model:
        model_class: "vqgan+"
        quantizer_type: "lookup-free"
        codebook_size: {codebook_size}
        token_size: 6
        commitment_cost: 0.25
        entropy_loss_weight: 0.02
        entropy_loss_temperature: 0.01
        entropy_gamma: 1.0
        num_channels: 3  # rgb
        hidden_channels: 32
        channel_mult: [1,1,2]
        num_resolutions: 3
        num_res_blocks: 1
        sample_with_conv: True
"""

_GENERATOR_YAML = """\
experiment:
    project: "MaskBit"
    name: "maskbit_generator_14bit"
    max_train_examples: 1_281_167 # total number of imagenet examples
    save_every: 100_000
    eval_every: 100_000
    generate_every: 10_000
    log_every: 50
    log_grad_norm_every: 100_000
    logger: "tensorboard"
    resume: True
    vqgan_checkpoint: "MODEL_PATH/maskbit_tokenizer_14bit.bin"

model:
{vq_model}
    mlm_model:
        model_cls: "lfq_bert"
        hidden_dim: 32
        depth: 2
        heads: 2
        mlp_dim: 64
        dropout: 0.0
        guidance_scale: 7.1
        guidance_annealing: "cosine"
        num_steps: 64
        train_mask_schedule_strategy: "arccos"
        gen_mask_schedule_strategy: "arccos"
        softmax_temperature: 1.0
        randomize_temperature: 7.8
        class_label_dropout: 0.1
        scale_pow: 3.0
        use_sampling_annealing: False
        codebook_splits: 2
        use_prenorm: False

losses:
    mlm:
        label_smoothing: 0.1
        sum_splits: False

dataset:
    params:
        train_shards_path_or_url: "DATA_PATH/imagenet_shards/train/imagenet-train-{{0000..0252}}.tar"
        eval_shards_path_or_url: "DATA_PATH/imagenet_shards/val/imagenet-val-{{0000..0009}}.tar"
        shuffle_buffer_size: 1000
        num_workers_per_gpu: 8
        pin_memory: True
        persistent_workers: True
    preprocessing:
        resolution: 16
        use_aspect_ratio_aug: False
        use_random_crop: True
        min_scale: 0.8
        interpolation: "bicubic"

optimizer:
    name: adamw
    params:
        learning_rate: 1e-4
        beta1: 0.9
        beta2: 0.96
        weight_decay: 0.045
        epsilon: 1e-8

lr_scheduler:
    scheduler: "cosine_with_minimum"
    params:
        learning_rate: ${{optimizer.params.learning_rate}}
        warmup_steps: 5_000

training:
    gradient_accumulation_steps: 1
    per_gpu_batch_size: 32
    mixed_precision: "no"
    enable_tf32: True
    use_ema: True
    seed: 42
    max_train_steps: 1_350_000
    overfit_batch: False
    overfit_batch_num: 1
    num_generated_images: 4 # Must be smaller than or equal to per_gpu_batch_size
    max_grad_norm: 1.0
"""

_TOKENIZER_YAML = """\
experiment:
    project: "MaskBit"
    name: "maskbit_tokenizer_14bit"
    max_train_examples: 1_281_167 # total number of imagenet examples
    save_every: 20_000
    eval_every: 20_000
    generate_every: 2000
    log_every: 50
    log_grad_norm_every: 100_000
    logger: "tensorboard"
    resume: True
    init_checkpoint: ""

model:
{vq_model}
    discriminator:
        name: "VQGAN+Discriminator"
        num_channels: 3
        num_stages: 4
        hidden_channels: 128
        blur_resample: True
        blur_kernel_size: 4

losses:
    quantizer_weight: 1.0
    perceptual_loss: "resnet50"
    perceptual_weight: 0.1
    reconstruction_loss: "l2"
    reconstruction_weight: 4.0
    discriminator_start: 20_000

dataset:
    preprocessing:
        resolution: 16

optimizer:
    name: adamw
    params:
        learning_rate: 1e-4

lr_scheduler:
    scheduler: "cosine_with_minimum"
    params:
        learning_rate: ${{optimizer.params.learning_rate}}
        warmup_steps: 5_000
"""


def build(seed: int = 0) -> tuple[LFQBert, ConvVQModel]:
    """The tiny generator and tokenizer that ``write`` saves, in eval mode (deterministic in seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():   # torch's default layer init draws from the global RNG
        torch.manual_seed(seed)
        generator = LFQBert(img_size=16, hidden_dim=32, codebook_size=2 ** 6, codebook_splits=2,
                            depth=2, heads=2, mlp_dim=64, dropout=0.0, nclass=1000, input_stride=4)
        tokenizer = ConvVQModel(ConvVQConfig(token_size=6, hidden_channels=32, channel_mult=(1, 1, 2),
                                             num_resolutions=3, num_res_blocks=1))
    generator.reset_parameters(g)
    with torch.no_grad():           # zero biases and unit norms would hide wiring mistakes
        for net, scale in ((generator, 0.5), (tokenizer, 0.1)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return generator.eval(), tokenizer.eval()


def write(folder: Path) -> tuple[dict, dict]:
    """Save the tiny MaskBit under ``folder``; returns (teacher.paths, teacher.options)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator, tokenizer = build()
    state = {("token_emb" + k[len("input_proj"):] if k.startswith("input_proj") else k): v
             for k, v in generator.state_dict().items()}
    torch.save(state, folder / GENERATOR_FILE)
    torch.save(tokenizer.state_dict(), folder / TOKENIZER_FILE)
    (folder / GENERATOR_YAML).write_text(
        _GENERATOR_YAML.format(vq_model=_VQ_MODEL.format(codebook_size=2 ** 6).rstrip("\n")))
    (folder / TOKENIZER_YAML).write_text(
        _TOKENIZER_YAML.format(vq_model=_VQ_MODEL.format(codebook_size=4096).rstrip("\n")))
    paths = {"generator": folder / GENERATOR_FILE, "generator_config": folder / GENERATOR_YAML,
             "tokenizer": folder / TOKENIZER_FILE, "tokenizer_config": folder / TOKENIZER_YAML}
    return paths, {}
