"""One-step generation from a trained student: x_init ~ p_init -> z_θ -> tokens -> decoder.

Used for sample grids during training, ``orchestrator.generate``, evaluation and benchmarks. The
same p_init and σ-noise as in training are applied at sampling time (Di[M]O).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from softdimo.math import masking
from softdimo.teachers.protocol import Teacher


@torch.no_grad()
def one_step_logits(teacher: Teacher, net: nn.Module, cond: torch.Tensor, generator: torch.Generator,
                    init_mask_ratio: Sequence[float] = (0.6,), embed_noise: float = 0.1) -> torch.Tensor:
    """Logits z [B, L, V] from one forward pass of ``net`` (θ or its EMA) in eval mode."""
    was_training = net.training
    net.eval()
    r_init = masking.draw_init_ratio(list(init_mask_ratio), generator)
    x_init = masking.sample_init(cond.shape[0], teacher.seq_len, teacher.V, teacher.mask_id,
                                 r_init, generator, device=cond.device)
    e = masking.embed_noise(teacher.embed_ids(x_init), embed_noise, generator)
    z = teacher.forward_embeddings(net, e, cond)[0].float()
    net.train(was_training)
    return z


@torch.no_grad()
def sample_from_logits(z: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                       argmax: bool = False) -> torch.Tensor:
    """Tokens [B, L] from logits [B, L, V]: argmax, or a categorical draw at ``temperature``."""
    if argmax:
        return z.argmax(dim=-1)
    probs = torch.softmax(z.float() / temperature, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1,
                             generator=generator).reshape(z.shape[:-1])


def one_step_tokens(teacher: Teacher, net: nn.Module, cond: torch.Tensor, generator: torch.Generator,
                    init_mask_ratio: Sequence[float] = (0.6,), embed_noise: float = 0.1,
                    temperature: float = 1.0, argmax: bool = False) -> torch.Tensor:
    """Tokens [B, L] from one forward pass of ``net`` (θ or its EMA)."""
    z = one_step_logits(teacher, net, cond, generator, init_mask_ratio, embed_noise)
    return sample_from_logits(z, generator, temperature, argmax)


def grid_conditions(teacher: Teacher, n: int, class_count: int, captions: Sequence[str],
                    device: torch.device) -> tuple[torch.Tensor, list]:
    """Fixed conditions for sample grids: classes in order (c2i) or the first captions (t2i)."""
    if teacher.conditioning == "class":
        labels = torch.arange(n, device=device) % class_count
        names = [captions[i] for i in labels.tolist()] if captions else []
        return teacher.encode_condition(labels=labels), names
    prompts = [captions[i % len(captions)] for i in range(n)]
    return teacher.encode_condition(prompts=prompts).to(device), prompts
