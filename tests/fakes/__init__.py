"""Tiny fake checkpoints of the real teachers, in their published file layouts (tests only)."""
