"""The inputs of ``orchestrator.tokenize``: listing image collections, and decoding one item.

An item is a plain dict (Ray Data rows are dicts): ``index`` (position in the list), ``path`` (an
image file, or the tar holding it), ``offset``/``size`` (the member's bytes inside a tar; -1 for a
plain file), ``label`` (class id, -1 for none) and ``caption`` ("" for none). Listing reads no
image: a tar is indexed from its headers, so a killed run restarts from the same list.

Layouts: an image folder (ImageNet's one-folder-per-class layout: labels are the sorted class
folders' positions; a flat folder has no labels), a list file (.jsonl with ``image`` and
``caption`` or ``label``; .tsv with path<TAB>caption; relative paths from the list's folder),
or WebDataset .tar shards (samples grouped by key: the image member plus .txt/.caption, .cls or
.json with ``caption``/``label``).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class InputError(ValueError):
    """Bad input: ``where`` is the file (and line) at fault."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def _item(index: int, path: Path, label: int = -1, caption: str = "", offset: int = -1,
          size: int = -1) -> dict:
    return {"index": index, "path": str(path), "offset": offset, "size": size, "label": int(label),
            "caption": " ".join(str(caption).split())}        # one line in captions.txt


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def list_folder(root: Path) -> tuple[list[dict], list[str]]:
    """An image folder -> (items, class names); class folders give labels, a flat folder none."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        items = []
        for label, name in enumerate(classes):
            for p in sorted((root / name).iterdir()):
                if _is_image(p):
                    items.append(_item(len(items), p, label))
        return items, classes
    return [_item(i, p) for i, p in enumerate(sorted(p for p in root.iterdir() if _is_image(p)))], []


def _field(row: dict, names: Iterable[str]):
    return next((row[n] for n in names if n in row), None)


def list_file(path: Path) -> list[dict]:
    """A .jsonl or .tsv list -> items (a missing image is listed: decoding counts it as bad)."""
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InputError(where, f"not a JSON object ({err.args[0]})") from None
            image = _field(row, ("image", "path", "file")) if isinstance(row, dict) else None
            if not isinstance(image, str):
                raise InputError(where, "needs an \"image\" path (and \"caption\" or \"label\")")
            caption, label = _field(row, ("caption", "text", "prompt")) or "", row.get("label", -1)
            if not isinstance(label, int) or isinstance(label, bool) or label < -1:
                raise InputError(where, f"label must be a non-negative integer, got {label!r}")
        else:
            cols = line.split("\t")
            if n == 1 and cols[0].strip().lower() in ("image", "path", "file", "url"):
                continue                                          # a header row
            image, caption, label = cols[0].strip(), (cols[1] if len(cols) > 1 else ""), -1
        p = Path(image).expanduser()
        items.append(_item(len(items), p if p.is_absolute() else path.parent / p, label, caption))
    return items


def list_tars(tars: list[Path]) -> list[dict]:
    """WebDataset shards -> items; one per image member, with its sample's caption and label."""
    items = []
    for tar in tars:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")     # WebDataset: key = path to the
                    stem, _, ext = base.partition(".")           # first dot of the file name
                    key = f"{folder}/{stem}" if folder else stem
                    s = samples.setdefault(key, {})
                    ext = ext.lower()
                    if "." + ext in IMAGE_EXTS:
                        s["image"] = m
                    elif ext in ("txt", "caption", "cls", "json"):
                        s[ext] = tf.extractfile(m).read().decode("utf-8", "replace")
        except (tarfile.TarError, OSError) as err:
            raise InputError(str(tar), f"not a readable tar file ({err})") from None
        for key, s in samples.items():
            if "image" not in s:
                continue
            meta = {}
            if "json" in s:
                try:
                    meta = json.loads(s["json"])
                except ValueError:
                    meta = {}
            meta = meta if isinstance(meta, dict) else {}
            caption = s.get("txt") or s.get("caption") or meta.get("caption", "")
            label = s.get("cls", meta.get("label", -1))
            try:
                label = int(str(label).strip())
            except ValueError:
                raise InputError(f"{tar}:{key}.cls", f"not an integer class id: {label!r}") from None
            m = s["image"]
            items.append(_item(len(items), tar, label, caption, m.offset_data, m.size))
    return items


def list_inputs(inputs: list[str]) -> tuple[list[dict], list[str]]:
    """CLI inputs (one folder, one list file, or tar files) -> (items, class names)."""
    paths = [Path(p).expanduser() for p in inputs]
    for p in paths:
        if not p.exists():
            raise InputError(str(p), "does not exist")
    if all(p.suffix == ".tar" for p in paths):
        items, classes = list_tars(paths), []
    elif len(paths) == 1 and paths[0].is_dir():
        tars = sorted(paths[0].glob("*.tar"))
        items, classes = (list_tars(tars), []) if tars else list_folder(paths[0])
    elif len(paths) == 1 and paths[0].suffix in (".jsonl", ".tsv"):
        items, classes = list_file(paths[0]), []
    else:
        raise InputError(str(paths[0]), "expected an image folder, a .jsonl/.tsv list or .tar shards")
    if not items:
        raise InputError(str(paths[0]), "holds no images")
    return items, classes


def read_bytes(item: dict) -> bytes:
    with open(item["path"], "rb") as f:
        if item["offset"] >= 0:
            f.seek(item["offset"])
            return f.read(item["size"])
        return f.read()


def decode_item(item: dict, preprocess) -> tuple[np.ndarray | None, str]:
    """-> (uint8 [3, S, S], "") or (None, "path: why") for an unreadable or corrupt image."""
    from PIL import Image

    from softdimo.teachers.encoding import prepare_image

    try:
        with Image.open(io.BytesIO(read_bytes(item))) as image:
            image.load()
            return prepare_image(image, preprocess), ""
    except Exception as err:          # PIL raises many kinds for bad bytes; all mean "skip it"
        where = item["path"] + (f"@{item['offset']}" if item["offset"] >= 0 else "")
        return None, f"{where}: {type(err).__name__}: {err}"
