"""FID throughput: the project's in-process path vs clean-fid's folder mode, same network, side by side.

    python benchmarks/fid_throughput.py                       # 2,000 + 2,000 images, batch 100
    python benchmarks/fid_throughput.py --num 200 --threads 2
    python benchmarks/fid_throughput.py --device cuda --weights /path/to/pt_inception-2015-12-05-6726825d.pth

Images: class-to-image scenes of the embedded world ("generated") and text-to-image scenes
("reference"), rendered at 32×32 and upsampled (nearest) to --size, ImageNet-256's size by default.
Both paths compute pool3 features of both sets and the FID between them with the SAME InceptionV3
object (evaluators.networks.inception):

  (a) project: uint8 tensors [B,3,H,W] straight into the network in one process, batch --batch;
  (b) clean-fid: PNG folders through ``cleanfid.fid.compute_fid(mode="legacy_tensorflow",
      custom_feat_extractor=...)`` (its DataLoader decodes each PNG and feeds float [B,3,H,W] in
      [0,255]; the wrapper rounds back to uint8 so both paths see the same pixels), batch
      --cleanfid-batch, --workers loader processes.

Throughput counts the 2·num images of both sets; PNG writing is not timed. Wall-clock rates move
with whatever else runs on the machine, so CPU seconds (this process's threads plus clean-fid's
loader workers) are reported too: on a shared machine their ratio is the steadier one. The target
ratio is >= 2x. On CPU the network dominates both paths (a 299×299 InceptionV3 forward costs about
6 GFLOP per image while a 256×256 PNG decodes in about 2 ms), so expect a ratio near 1 there; the gap
can only open on a GPU, where clean-fid's per-image PNG decoding becomes the bottleneck. Without --weights the network
has RANDOM weights (no weights can be downloaded): the FIDs are only for comparing the two paths.
Cost on 2 shared CPU cores: about 1-5 images/s per path, i.e. 15-60 minutes for the default 2,000
(8,000 network passes in all); use --num 100 --rounds 3 for a quick check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image


def world_images(n: int, track: str, size: int, seed: int) -> torch.Tensor:
    """n uint8 images [N,3,size,size] of the embedded world's scenes (nearest upsampling from 32×32)."""
    from softdimo.world.scenes import c2i_scenes, render, t2i_scenes

    scenes = (c2i_scenes if track == "c2i" else t2i_scenes)(n, seed)
    images = render(scenes)
    factor = max(1, size // images.shape[-1])
    return images.repeat_interleave(factor, 2).repeat_interleave(factor, 3).contiguous()


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def random_inception(seed: int = 0) -> torch.nn.Module:
    """InceptionV3 with Kaiming-initialised convs (default init collapses the features)."""
    from evaluators.networks.inception import InceptionV3

    torch.manual_seed(seed)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval().requires_grad_(False)


class CleanFidExtractor(torch.nn.Module):
    """clean-fid's custom_feat_extractor: float [B,3,H,W] in [0,255] -> pool3 [B,2048] of our network.

    In legacy_tensorflow mode clean-fid loads PNGs as uint8 and hands over ``ToTensor()(x) * 255``,
    which is within float rounding of the integers, so rounding recovers the exact uint8 pixels.
    """

    def __init__(self, net: torch.nn.Module, dims: int | None = None):
        super().__init__()
        self.net, self.dims = net, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.round().clamp(0, 255).to(torch.uint8))["pool3"][:, :self.dims]


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (clean-fid's DataLoader workers), all threads."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], float]) -> tuple[float, float, float]:
    """(result, wall seconds, CPU seconds) of fn()."""
    t, c = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - t, cpu_seconds() - c


def measure(num: int = 2000, batch: int = 100, cleanfid_batch: int = 32, workers: int = 0,
            rounds: int = 1, size: int = 256, device: str | torch.device = "cpu",
            weights: str | None = None, dims: int | None = None) -> dict:
    """Both paths on the same ``num`` + ``num`` images and the same network; medians over rounds.

    Returns images/s, wall and CPU seconds of each path, both FIDs and |ΔFID|, the ratios, and the
    settings (a plain dict for the GPU suite's report). ``dims`` keeps the first ``dims`` of the
    2048 pool3 features on both paths (a smoke run: the two 2048² matrix square roots cost minutes
    on a loaded CPU); None keeps them all, as FID does.
    """
    import cleanfid.fid as cleanfid_fid

    from evaluators.metrics.fid import fid_from_features
    from evaluators.networks.inception import extract_features, load_inception

    device = torch.device(device)
    net = (load_inception(weights, device) if weights else random_inception().to(device))
    generated = world_images(num, "c2i", size, seed=0)
    reference = world_images(num, "t2i", size, seed=1)

    def project() -> float:
        return fid_from_features(extract_features(net, generated, batch, device)["pool3"][:, :dims],
                                 extract_features(net, reference, batch, device)["pool3"][:, :dims])

    def clean_fid() -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)       # clean-fid's scipy sqrtm(disp=)
            return cleanfid_fid.compute_fid(
                str(folders[0]), str(folders[1]), mode="legacy_tensorflow",
                custom_feat_extractor=CleanFidExtractor(net, dims), num_workers=workers,
                batch_size=cleanfid_batch, device=device, verbose=False, use_dataparallel=False)

    def synced(fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run

    load_before = os.getloadavg()[0]
    runs: dict[str, list[tuple[float, float, float]]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="fid_throughput_") as tmp:
        folders = (Path(tmp) / "generated", Path(tmp) / "reference")
        t = time.perf_counter()
        write_pngs(generated, folders[0])
        write_pngs(reference, folders[1])
        t_png = time.perf_counter() - t
        extract_features(net, generated[:2], device=device)          # warm-up (allocator, kernels)
        for r in range(rounds):   # alternate the order so load drift hits both paths alike
            for name in ("ab" if r % 2 == 0 else "ba"):
                runs[name].append(timed(synced(project if name == "a" else clean_fid)))

    n = 2 * num
    (fid_a, t_a, c_a), (fid_b, t_b, c_b) = (
        (runs[k][-1][0], *(statistics.median(run[i] for run in runs[k]) for i in (1, 2))) for k in "ab")
    return {
        "weights": weights or "RANDOM (Kaiming) weights: FIDs compare the paths, not image quality",
        "num_per_set": num, "images": n, "feature_dims": dims or 2048, "size": size, "device": str(device), "rounds": rounds,
        "torch_threads": torch.get_num_threads(), "png_seconds": t_png,
        "project": {"batch": batch, "images_per_second": n / t_a, "wall_seconds": t_a,
                    "images_per_cpu_second": n / c_a if c_a > 0 else None, "fid": fid_a},
        "cleanfid": {"batch": cleanfid_batch, "workers": workers, "images_per_second": n / t_b,
                     "wall_seconds": t_b, "images_per_cpu_second": n / c_b if c_b > 0 else None,
                     "fid": fid_b},
        "ratio_wall": t_b / t_a, "ratio_cpu": (c_b / c_a) if c_a > 0 else None,
        "abs_delta_fid": abs(fid_a - fid_b), "target_ratio": 2.0, "target_abs_delta_fid": 1e-3,
        "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000, help="images per set (generated and reference)")
    p.add_argument("--batch", type=int, default=100, help="batch of the project path")
    p.add_argument("--cleanfid-batch", type=int, default=32, help="batch of clean-fid (its default: 32)")
    p.add_argument("--workers", type=int, default=0, help="clean-fid DataLoader workers")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (a,b / b,a ...); medians")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--weights", default=None, help="FID Inception .pth; default: random weights")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.num, args.batch, args.cleanfid_batch, args.workers, args.rounds, args.size,
                args.device, args.weights)
    a, b = r["project"], r["cleanfid"]
    print(f"FID Inception weights: {r['weights']}")
    print(f"{args.num} generated + {args.num} reference images, {args.size}x{args.size}, device {r['device']}, "
          f"torch threads {r['torch_threads']}, {args.rounds} round(s), medians; "
          f"PNGs written in {r['png_seconds']:.1f} s (not timed)")
    print(f"(a) project, uint8 tensors, batch {args.batch:3d}       : {a['images_per_second']:8.2f} images/s  "
          f"({a['wall_seconds']:7.1f} s wall, {a['images_per_cpu_second']:6.2f} images/CPU-s)  FID {a['fid']:.6f}")
    print(f"(b) clean-fid folders, batch {args.cleanfid_batch:3d}, {args.workers} workers: "
          f"{b['images_per_second']:8.2f} images/s  ({b['wall_seconds']:7.1f} s wall, "
          f"{b['images_per_cpu_second']:6.2f} images/CPU-s)  FID {b['fid']:.6f}")
    print(f"throughput ratio (a)/(b): {r['ratio_wall']:.2f}x wall, {r['ratio_cpu']:.2f}x CPU time  "
          f"(target >= 2x)   |dFID| = {r['abs_delta_fid']:.3g}")
    # other processes on the machine shift the ratio; the load average says how much to trust it
    print(f"1-min load average: {r['load_average'][0]:.1f} before, {r['load_average'][1]:.1f} after, "
          f"on {r['cpus']} CPUs")


if __name__ == "__main__":
    main()
