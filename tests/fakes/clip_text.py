"""A tiny CLIP BPE tokenizer folder written locally (no hub), for the fake aMUSEd and Meissonic.

Each fake picks its own vocabulary (token order decides the ids, hence the conditions its tests
see); this writes the four files ``CLIPTokenizer.from_pretrained`` reads: vocab.json, merges.txt,
special_tokens_map.json and tokenizer_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP pads and maps unknown text to <|endoftext|>
SPECIALS = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}


def write_tokenizer(folder: Path, tokens: Sequence[str], merges: Sequence[str] = (),
                    max_length: int = 77, **config) -> None:
    """``tokens`` get ids 0, 1, ... in order (they must include START and END); ``merges`` are BPE
    pairs "a b"; ``config`` adds tokenizer_config.json entries."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIALS))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **config, **SPECIALS}))
