"""A tiny random MaskGIT v1 + taming VQGAN in the published file layout (llvictorll/Maskgit-pytorch).

Files, as ``download_models.py`` stores them:
- ``pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth``: {"iter", "global_epoch",
  "model_state_dict", "optimizer_state_dict"} (v1.0 ``Trainer.save_network``);
- ``pretrained_maskgit/VQGAN/last.ckpt``: a Lightning checkpoint whose ``state_dict`` is the whole
  VQModel's, with encoder, quant_conv and loss (LPIPS + discriminator) keys besides the decoder side;
- ``pretrained_maskgit/VQGAN/model.yaml``: the taming config (model.params with ddconfig, lossconfig).

Sizes (teachers.md §2.5): transformer width 32, 2 blocks, 2 heads, 4×4 tokens, 16 codes, 10 classes;
VQGAN f2 (ch 32, ch_mult [1, 2]), codebook 16×8, so images are 8×8.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from softdimo.teachers.maskgit_modules import MaskTransformer, VQGANDecoder

OPTIONS = {"hidden_dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "dropout": 0.0, "nclass": 10,
           "f_factor": 4}
N_EMBED, EMBED_DIM = 16, 8
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}

MODEL_YAML = f"""model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {EMBED_DIM}
    n_embed: {N_EMBED}
    ddconfig:
      double_z: false
      z_channels: {DDCONFIG['z_channels']}
      resolution: {DDCONFIG['resolution']}
      in_channels: 3
      out_ch: 3
      ch: {DDCONFIG['ch']}
      ch_mult:
      - 1
      - 2
      num_res_blocks: {DDCONFIG['num_res_blocks']}
      attn_resolutions:
      - 8
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""

# Keys a real VQModel checkpoint carries that neither side uses (a sample of each kind); the
# encoder side (encoder.*, quant_conv.*) is a full random VQGANEncoder sharing the decoder's codebook.
_OTHER_VQGAN_KEYS = {
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
    "loss.discriminator.main.0.weight": (64, 3, 4, 4), "loss.discriminator.main.0.bias": (64,),
    "loss.discriminator.main.2.weight": (128, 64, 4, 4),
    "loss.discriminator.main.3.running_mean": (128,),
}


def build(seed: int = 0) -> tuple[MaskTransformer, VQGANDecoder]:
    """The tiny transformer and VQGAN decoder with seeded random weights (global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MaskTransformer(img_size=OPTIONS["f_factor"] * 2, codebook_size=N_EMBED, **OPTIONS)
        decoder_config = {k: v for k, v in DDCONFIG.items() if k not in ("double_z", "in_channels")}
        vqgan = VQGANDecoder(N_EMBED, EMBED_DIM, decoder_config)
    with torch.no_grad():
        # zero biases and unit norms would hide mix-ups: give every tensor random values
        for p in list(net.parameters()) + list(vqgan.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5))
        vqgan.quantize.embedding.weight.mul_(5.0)
    return net.eval(), vqgan.eval()


def build_encoder(vqgan: VQGANDecoder, seed: int = 2):
    """The matching taming encoder side with seeded random weights and ``vqgan``'s codebook."""
    from softdimo.teachers.maskgit_encoder import VQGANEncoder

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = VQGANEncoder(N_EMBED, EMBED_DIM, dict(DDCONFIG))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.startswith("quantize."):
                p.copy_(vqgan.quantize.embedding.weight)
            elif "norm" in name:                          # GroupNorm: keep the scale near 1
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return enc.eval()


def write(folder: Path) -> tuple[dict, dict]:
    """Save the tiny model in the published layout under ``folder``; returns (paths, options)."""
    net, vqgan = build()
    mg, vq = Path(folder) / "pretrained_maskgit" / "MaskGIT", Path(folder) / "pretrained_maskgit" / "VQGAN"
    mg.mkdir(parents=True, exist_ok=True)
    vq.mkdir(parents=True, exist_ok=True)
    optim = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.96))
    torch.save({"iter": 1_500_000, "global_epoch": 300, "model_state_dict": net.state_dict(),
                "optimizer_state_dict": optim.state_dict()}, mg / "MaskGIT_ImageNet_256.pth")

    g = torch.Generator().manual_seed(1)
    state = OrderedDict((k, torch.randn(s, generator=g)) for k, s in _OTHER_VQGAN_KEYS.items())
    state.update({k: v for k, v in build_encoder(vqgan).state_dict().items() if not k.startswith("quantize.")})
    state.update(vqgan.state_dict())
    torch.save({"epoch": 12, "global_step": 250_000, "pytorch-lightning_version": "1.0.8",
                "state_dict": state, "optimizer_states": [], "lr_schedulers": []}, vq / "last.ckpt")
    (vq / "model.yaml").write_text(MODEL_YAML)
    paths = {"transformer": str(mg / "MaskGIT_ImageNet_256.pth"), "vqgan": str(vq / "last.ckpt"),
             "vqgan_config": str(vq / "model.yaml")}
    return paths, dict(OPTIONS)
