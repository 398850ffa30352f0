"""Images per second of tokenization: the Ray Data pipeline vs the same stages in one plain loop.

    python benchmarks/tokenize_throughput.py IMAGE_FOLDER --spec test
    python benchmarks/tokenize_throughput.py IMAGE_FOLDER --spec full --actors 2 --batch-size 64

Both read, decode, resize/crop and encode the same images with the world tokenizer on the CPU, one
torch thread per encoder. The loop is ``decode_item`` + ``Encoder.encode`` in this process; the
pipeline is ``orchestrator.tokenize`` (Ray started before timing, so its start-up is reported
apart). Also printed: the encoder alone on already-decoded images, the ceiling of both.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--spec", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    from orchestrator.tokenize import parser, run
    from orchestrator.tokenize_inputs import decode_item, list_inputs
    from softdimo.teachers.encoding import load_encoder, to_unit
    from softdimo.world.layout import default_cache_dir

    items, _ = list_inputs([args.folder])
    enc = load_encoder("world_c2i", options={"spec": args.spec, "cache_dir": str(default_cache_dir())})
    start = time.perf_counter()
    images = np.stack([decode_item(it, enc.preprocess)[0] for it in items])
    decoded = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        enc.encode(to_unit(images[i:i + args.batch_size]))
    loop = time.perf_counter() - start
    encode_only = time.perf_counter() - decoded

    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray_start = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        argv = [args.folder, "--teacher", "world_c2i", "--world-spec", args.spec, "--out", out,
                "--shard-size", "1024", "--batch-size", str(args.batch_size), "--actors",
                str(args.actors), "--threads", "1", "--quiet"]
        result = run(parser().parse_args(argv), log=lambda *_: None)
    ray.shutdown()
    n = len(items)
    print(f"{n} images, world {args.spec!r} tokenizer ({enc.preprocess.size} px -> {enc.seq_len} tokens), "
          f"batch {args.batch_size}, {os.cpu_count()} cores")
    print(f"encoder alone (decoded images): {n / encode_only:8.1f} images/s")
    print(f"plain loop (decode + encode):   {n / loop:8.1f} images/s")
    print(f"Ray Data pipeline, {args.actors} actor(s): {n / result['seconds']:8.1f} images/s "
          f"(Ray start {ray_start:.1f} s, not counted; after the first batch "
          f"{result['steady_images_per_s'] or 0:.1f} images/s)")
    print(f"pipeline / loop: {loop / result['seconds']:.2f}x")


if __name__ == "__main__":
    main()
