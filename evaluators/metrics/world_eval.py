"""World-FID: Fréchet distance on the embedded world's feature network, for teachers and students.

Generation for evaluation uses fixed seeds and fixed, balanced conditions (classes cycled in order,
or the held-out captions in order), so numbers are comparable across checkpoints and step counts.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluators.metrics.fid import fid_bootstrap_se, fid_from_features
from softdimo.teachers.protocol import Teacher
from trainers.sampling import one_step_tokens


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] in [0,255] or float in [0,1] -> float in [0,1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def extract_features(feature_net: torch.nn.Module, images: torch.Tensor, batch: int = 500,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """Feature vectors [N, F] (float64) of images [N, 3, H, W]."""
    out = []
    for start in range(0, images.shape[0], batch):
        chunk = as_float_images(images[start:start + batch]).to(device)
        out.append(feature_net.features(chunk).double().cpu())
    return torch.cat(out).numpy()


def world_fid(feature_net: torch.nn.Module, generated: torch.Tensor, reference: torch.Tensor,
              device: torch.device | str = "cpu", with_se: bool = False) -> float | tuple[float, float]:
    """World-FID of ``generated`` against ``reference``; with ``with_se``, (FID, bootstrap SE)."""
    gen = extract_features(feature_net, generated, device=device)
    ref = extract_features(feature_net, reference, device=device)
    fid = fid_from_features(gen, ref)
    return (fid, fid_bootstrap_se(gen, ref)) if with_se else fid


def eval_conditions(teacher: Teacher, n: int, num_classes: int, captions: Sequence[str]) -> list:
    """n fixed conditions: class ids cycled in order (class) or captions cycled in order (text)."""
    if teacher.conditioning == "class":
        return [i % num_classes for i in range(n)]
    return [captions[i % len(captions)] for i in range(n)]


def _encode(teacher: Teacher, conds: list, device: torch.device) -> torch.Tensor:
    if teacher.conditioning == "class":
        return teacher.encode_condition(labels=torch.tensor(conds, device=device))
    return teacher.encode_condition(prompts=conds).to(device)


@torch.no_grad()
def generate_images(sample_tokens: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                    teacher: Teacher, conds: list, seed: int, batch: int = 250,
                    device: torch.device | str = "cpu", desc: str = "sampling",
                    progress: bool = True) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from ``sample_tokens(cond, generator) -> tokens [B, L]``."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in tqdm(range(0, len(conds), batch), desc=desc, disable=not progress, leave=False):
        cond = _encode(teacher, conds[start:start + batch], device)
        images.append(teacher.decode_ids(sample_tokens(cond, g), cond).float().cpu())
    return torch.cat(images)


def teacher_sampler(teacher: Teacher, steps: int, cfg: float, temperature: float = 1.0,
                    randomize: float = 4.5):
    return lambda cond, g: teacher.sample(cond, steps, cfg, g, temperature=temperature,
                                          randomize=randomize)


def student_sampler(teacher: Teacher, net: torch.nn.Module, init_mask_ratio: Sequence[float],
                    embed_noise: float, temperature: float = 1.0, argmax: bool = False):
    return lambda cond, g: one_step_tokens(teacher, net, cond, g, init_mask_ratio, embed_noise,
                                           temperature, argmax)
