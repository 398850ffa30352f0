"""Tokenize an image collection with a teacher's own encoder into memory-mapped token shards.

    python -m orchestrator.tokenize /data/imagenet/train --config sweeps/presets/maskgit.yaml --out tokens/maskgit
    python -m orchestrator.tokenize pairs.jsonl --teacher maskgen --path tokenizer=/w/tatitok --out tokens/mg
    python -m orchestrator.tokenize shards/ --teacher world_t2i --world-spec test --out tokens/world

INPUT is an image folder (one sub-folder per class, as ImageNet's train/: labels are the sorted
class folders' positions), a .jsonl/.tsv list of images with captions, or WebDataset .tar shards.
A Ray Data pipeline reads, decodes and resizes/crops each image as the teacher's tokenizer was
trained (CPU tasks), encodes batches on encoder actors (CPU or GPU) and this process writes shards
of --shard-size items plus manifest.json (and captions.txt). Point ``data.tokens`` at the manifest.
A rerun with the same arguments skips finished shards; unreadable images are skipped and counted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from orchestrator.config import UserError, load_yaml, run_cli
from orchestrator.tokenize_inputs import InputError, decode_item, list_inputs
from trainers.shards import CAPTIONS, FORMAT, MANIFEST, shard_name, shard_record, write_shard

JOB = "job.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="an image folder, a .jsonl/.tsv list, or .tar shards")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--config", help="a training preset: its teacher.kind/paths/options (and world.spec)")
    p.add_argument("--teacher", help="teacher kind: maskgit, maskbit, maskgen, meissonic, amused, "
                                     "world_c2i, world_t2i (overrides the preset's)")
    p.add_argument("--path", action="append", default=[], metavar="KEY=PATH", help="a teacher.paths entry")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a teacher.options entry (VALUE parsed as JSON when it can be)")
    p.add_argument("--world-spec", default=None, help="world kinds: which embedded world (default full)")
    p.add_argument("--shard-size", type=int, default=4096, help="input items per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    p.add_argument("--actors", type=int, default=1, help="encoder actors (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per encoder actor (default 0: CPU)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default all)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per encoder actor (default torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _pairs(items: Sequence[str], flag: str, parse_json: bool) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        if parse_json:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def resolve_teacher(args) -> tuple[str, dict, dict]:
    """(kind, paths, options) from --config and/or --teacher/--path/--option (flags win)."""
    kind, paths, options, spec = None, {}, {}, None
    if args.config:
        from omegaconf import OmegaConf

        try:       # only the teacher and world sections: the preset's data files need not exist yet
            node = OmegaConf.to_container(load_yaml(args.config), resolve=True)
        except Exception as err:      # an interpolation that cannot resolve, e.g. a missing env var
            raise UserError(f"{args.config}: {str(err).splitlines()[0]}") from None
        teacher = node.get("teacher") or {}
        kind = teacher.get("kind", "world_c2i")
        paths, options = dict(teacher.get("paths") or {}), dict(teacher.get("options") or {})
        spec = (node.get("world") or {}).get("spec")
    kind = args.teacher or kind
    if not kind:
        raise UserError("--teacher: name a teacher kind, or give --config PRESET")
    paths.update(_pairs(args.path, "--path", False))
    options.update(_pairs(args.option, "--option", True))
    if kind.startswith("world_"):
        from softdimo.world.layout import default_cache_dir

        options = {"spec": args.world_spec or spec or "full", "cache_dir": str(default_cache_dir())}
    return kind, paths, options


# ----------------------------------------------------------------- the two pipeline stages
def decode_batch(batch: dict, preprocess) -> dict:
    """Ray Data stage 1 (CPU tasks): item rows -> uint8 images [n, 3, S, S] and per-row errors."""
    n, s = len(batch["index"]), preprocess.size
    images, errors = np.zeros((n, 3, s, s), dtype=np.uint8), []
    for i in range(n):
        item = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        image, error = decode_item(item, preprocess)
        if image is not None:
            images[i] = image
        errors.append(error)
    return {"index": np.asarray(batch["index"], dtype=np.int64),
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image": images, "error": np.asarray(errors, dtype=object)}


class EncodeBatch:
    """Ray Data stage 2 (actors, the encoder resident): images -> tokens [n, L] (-1 rows for bad ones)."""

    def __init__(self, kind: str, paths: dict, options: dict, device: str, threads: int = 0):
        import torch

        from softdimo.teachers.encoding import load_encoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = load_encoder(kind, paths, options, device)
        self.device = device

    def __call__(self, batch: dict) -> dict:
        from softdimo.teachers.encoding import to_unit

        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        tokens = np.full((len(ok), self.encoder.seq_len), -1, dtype=np.int32)
        if ok.any():
            ids = self.encoder.encode(to_unit(batch["image"][ok], self.device))
            tokens[ok] = ids.cpu().numpy().astype(np.int32)
        return {"index": batch["index"], "label": batch["label"], "tokens": tokens, "error": batch["error"]}


# ----------------------------------------------------------------- shards
class ShardAssembler:
    """Collects encoded rows by shard (shard s = items [s·S, (s+1)·S)) and writes each one complete."""

    def __init__(self, out: Path, shard_size: int, total: int, vocab: int, seq_len: int):
        self.out, self.size, self.total, self.vocab, self.seq_len = out, shard_size, total, vocab, seq_len
        self.rows: dict[int, list] = {}
        self.records: dict[int, dict] = {}

    def items_in(self, shard: int) -> int:
        return min(self.size, self.total - shard * self.size)

    def add(self, batch: dict) -> int:
        """Take one encoded batch; returns how many items it covered."""
        for i, index in enumerate(np.asarray(batch["index"]).tolist()):
            shard = index // self.size
            self.rows.setdefault(shard, []).append(
                (index, int(batch["label"][i]), batch["tokens"][i], str(batch["error"][i])))
            if len(self.rows[shard]) == self.items_in(shard):
                self._write(shard, sorted(self.rows.pop(shard), key=lambda r: r[0]))
        return len(batch["index"])

    def _write(self, shard: int, rows: list) -> None:
        good = [r for r in rows if not r[3]]
        errors = [r[3] for r in rows if r[3]]
        tokens = np.stack([r[2] for r in good]) if good else np.zeros((0, self.seq_len), np.int32)
        self.records[shard] = write_shard(self.out, shard, tokens, [r[0] for r in good], [r[1] for r in good],
                                          len(rows), len(errors), errors, self.vocab, self.seq_len)


def finished_shards(out: Path, shards: int) -> dict[int, dict]:
    """Records of the shards already on disk (written atomically, so a present file is complete)."""
    return {s: shard_record(out / shard_name(s)) for s in range(shards) if (out / shard_name(s)).is_file()}


def prepare_out(out: Path, job: dict) -> None:
    """Create ``out`` or check that it holds shards of this very job (same inputs, teacher, sizes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB
    if path.is_file():
        if json.loads(path.read_text()) != job:
            raise UserError(f"{out}: holds shards of another tokenization (its {JOB} differs); "
                            "use a new --out folder")
    else:
        path.write_text(json.dumps(job, indent=2))


def write_manifest(out: Path, job: dict, records: dict[int, dict], classes: list, captions: bool) -> dict:
    shards = [records[s] for s in sorted(records)]
    manifest = {"format": FORMAT, **{k: job[k] for k in ("teacher", "conditioning", "seq_len", "vocab",
                                                           "image_size", "items", "shard_size")},
                "rows": sum(r["rows"] for r in shards), "bad": sum(r["bad"] for r in shards),
                "classes": classes, "captions": CAPTIONS if captions else None, "shards": shards}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def run(args, log=print) -> dict:
    """The whole job; returns the manifest plus ``encoded_items`` and ``seconds`` of this run."""
    kind, paths, options = resolve_teacher(args)
    from softdimo.teachers import FAMILIES, TeacherFilesMissing, TeacherOptionError
    from softdimo.teachers.encoding import ENCODERS, load_encoder

    if kind not in ENCODERS:
        raise UserError(f"--teacher: unknown kind {kind!r}; expected one of {', '.join(ENCODERS)}")
    for flag in ("shard_size", "batch_size", "actors"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    try:
        items, classes = list_inputs(args.inputs)
        probe = load_encoder(kind, paths, options, "cpu")      # files checked before Ray starts
    except InputError as err:
        raise UserError(str(err)) from None
    except (TeacherFilesMissing, TeacherOptionError) as err:
        raise UserError(f"{args.config or '--path/--option'}: {err.key}: {err.message}") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{kind} encoder: {str(err).splitlines()[0]}") from None
    pre, seq_len, vocab = probe.preprocess, probe.seq_len, probe.V
    del probe
    conditioning = {"world_c2i": "class", "world_t2i": "text"}.get(kind) or FAMILIES[kind].conditioning
    digest = hashlib.sha256()                  # the input list's identity, item by item (1M items)
    for it in items:
        digest.update(json.dumps(it, sort_keys=True).encode())
    listing = digest.hexdigest()[:16]
    job = {"teacher": kind, "paths": {k: str(v) for k, v in paths.items()}, "options": options,
           "conditioning": conditioning, "seq_len": seq_len, "vocab": vocab, "image_size": pre.size,
           "items": len(items), "shard_size": args.shard_size, "listing": listing}
    out = Path(args.out).expanduser()
    prepare_out(out, job)
    captions = any(it["caption"] for it in items)
    if captions and not (out / CAPTIONS).is_file():
        (out / CAPTIONS).write_text("\n".join(it["caption"] for it in items) + "\n", encoding="utf-8")
    shards = -(-len(items) // args.shard_size)
    done = finished_shards(out, shards)
    pending = [it for it in items if it["index"] // args.shard_size not in done]
    log(f"{len(items)} images in {shards} shards ({len(done)} already done), {kind} encoder at "
        f"{pre.size} px -> {seq_len} tokens")
    start, timing = time.perf_counter(), {"ray_start": 0.0}
    assembler = ShardAssembler(out, args.shard_size, len(items), vocab, seq_len)
    if pending:
        _pipeline(args, kind, paths, options, pre, pending, assembler, len(items) - len(pending), timing)
    seconds = time.perf_counter() - start - timing["ray_start"]
    manifest = write_manifest(out, job, {**done, **assembler.records}, classes, captions)
    return {**manifest, "encoded_items": len(pending), "seconds": seconds, "ray_start": timing["ray_start"],
            "steady_images_per_s": timing.get("steady")}


def _pipeline(args, kind, paths, options, pre, pending, assembler, already: int, timing: dict) -> None:
    """read/decode/preprocess (tasks) -> encode (actors) -> shards written here, as batches arrive."""
    import logging

    import ray
    from tqdm import tqdm

    timing["t0"] = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, num_cpus=None if args.address else args.num_cpus,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    timing["ray_start"] = time.perf_counter() - timing.pop("t0")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        blocks = max(1, min(len(pending) // args.batch_size, 256))
        device = "cuda" if args.gpus_per_actor > 0 else "cpu"
        ds = ray.data.from_items(pending, override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, fn_kwargs={"preprocess": pre}, batch_size=args.batch_size,
                            batch_format="numpy", num_cpus=1)
        ds = ds.map_batches(EncodeBatch, fn_constructor_args=(kind, paths, options, device, args.threads),
                            batch_size=args.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=args.actors),
                            num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor)
        bar = tqdm(total=len(pending) + already, initial=already, unit="img", disable=args.quiet,
                   desc="tokenize")
        first = None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:        # everything after this is steady state (actors up, encoder loaded)
                first, timing["first_batch"] = time.perf_counter(), len(batch["index"])
            bar.update(assembler.add(batch))
        if first is not None:
            timing["steady"] = (len(pending) - timing.pop("first_batch")) / max(time.perf_counter() - first, 1e-9)
        bar.close()
    finally:
        if started:
            ray.shutdown()
    if assembler.rows:              # every pending item comes back exactly once
        raise RuntimeError(f"shards {sorted(assembler.rows)} did not receive all their items")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    rate = result["encoded_items"] / max(result["seconds"], 1e-9)
    print(f"{result['rows']} of {result['items']} images tokenized ({result['bad']} unreadable, "
          f"skipped); this run: {result['encoded_items']} images in {result['seconds']:.1f} s "
          f"({rate:.1f} images/s; after the first batch {result['steady_images_per_s'] or 0:.1f} images/s; "
          f"Ray started in {result['ray_start']:.1f} s)")
    for rec in result["shards"]:
        for error in rec["errors"][:2]:
            print(f"  skipped {error}")
    print(f"manifest: {Path(args.out) / MANIFEST}   (data.tokens={Path(args.out) / MANIFEST})")
    return 0


if __name__ == "__main__":
    run_cli(main)
