"""The pure tensor maths of Soft-Di[M]O, at the bottom of the dependency arrow.

Soft embedding (Eq. 3, ``soft_embedding``), forward masking (``masking``), Di[M]O's divergence
gradients, surrogate, total loss (Eq. 10) and masked KL (``dimo``), GAN losses (Eq. 7-8, ``gan``),
the reward loss (Eq. 9, ``reward``), EMA (``ema``) and diagnostics (``diagnostics``). These modules
import torch and the standard library only (tests/unit/test_layers.py); models, trainers and
evaluators import them, never the other way round.

The names below are the one source of each choice: the config schema (trainers/config.py) checks
against them and the maths dispatches on them. This file imports nothing, so reading the schema
does not load torch.
"""
DIVERGENCES = ("fkl", "rkl", "jeffreys")         # dimo.divergence_grad
EMBEDDING_KINDS = ("soft", "gumbel_st")          # soft_embedding.relaxed_probs
MASK_SCHEDULES = ("arccos", "cosine", "linear")  # masking.mask_ratio
