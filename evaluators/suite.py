"""Score a checkpoint with the paper's metrics: one place for generation settings and metric choice.

``Evaluator`` loads its scorer networks once (the pool keeps one per actor) and ``evaluate(checkpoint)``
generates with the checkpoint's EMA weights at a fixed seed and fixed, balanced conditions, for each
of the requested sampling temperatures, and returns every metric at the temperature that is best
for the first metric (the paper reports the best temperature). Images are quantised to uint8 by
rounding, as saved PNGs would be, before any metric sees them.

Metrics (``METRICS``): on the embedded world ``world_fid``, ``world_clip`` (its tiny CLIP's cosine)
and ``geneval_world`` (text-to-image); with staged real weights ``fid5k``/``fid50k`` (ADM protocol,
Inception pool3 vs reference statistics), ``is``, ``prdc`` (precision/recall k=3, density/coverage
k=5 against the reference images), ``clip``, ``hps``, ``hps_v21``, ``pickscore``, ``imagereward``
and ``geneval`` (official metadata, HF Mask2Former detector).

With ``test_time`` set (trainers.config.TestTime fields), the prompt-based metrics (``TEST_TIME_METRICS``)
are computed a second time on test-time-scaled images (Best-of-N / TTEO, evaluators.scaled_sampling) and
reported as ``eval/tts/<metric>``, with ``eval/tts/seconds_per_prompt``: a sweep shows GenEval and
HPS with and without test-time scaling side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

WORLD_METRICS = ("world_fid", "world_clip", "geneval_world")
SCORE_METRICS = ("clip", "hps", "hps_v21", "pickscore", "imagereward")
# fid30k: text-to-image FID (COCO-30k, MJHQ-30k) through clean-fid's clean mode (H.5; evaluators.metrics.clean_fid)
# against --reference: clean-fid statistics (npz mu, sigma) or a folder of real images
INCEPTION_METRICS = ("fid5k", "fid50k", "fid30k", "is", "prdc")
METRICS = WORLD_METRICS + INCEPTION_METRICS + SCORE_METRICS + ("geneval",)
TEST_TIME_METRICS = ("world_clip", "geneval_world") + SCORE_METRICS + ("geneval",)
LOWER_IS_BETTER = ("world_fid", "fid5k", "fid50k", "fid30k")
FIXED_COUNTS = {"fid5k": 5000, "fid50k": 50000, "fid30k": 30000}
# the staged weight files (evaluators.networks.weights keys) each metric reads
WEIGHTS_NEEDED = {
    "fid5k": ("inception", "adm_ref"), "fid50k": ("inception", "adm_ref"),
    "fid30k": ("clean_fid_inception",), "is": ("inception",),
    "prdc": ("inception", "adm_ref"), "clip": ("clip_g14",), "hps": ("hps_v2",), "hps_v21": ("hps_v21",),
    "pickscore": ("pickscore", "pickscore_proc"),
    "imagereward": ("imagereward", "imagereward_med", "bert_vocab"),
    "geneval": ("geneval_meta", "mask2former", "clip_l14"),
}


def _geneval_values(name: str, rows: list) -> dict:
    """GenEval's results rows -> overall as <name>, its bootstrap SE over prompts as <name>_se (a
    single evaluation's noise, as world_fid_se), each task as <name>/<task> (the six task scores)."""
    from evaluators.geneval.official import TASKS, summarise
    from evaluators.geneval.results import overall_se

    summary = summarise(rows)
    out = {name: float(summary["overall"]), f"{name}_se": overall_se(rows)}
    out.update({f"{name}/{task}": float(summary[task]) for task in TASKS if task in summary})
    return out


def check_metrics(names) -> list[str]:
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if not names:
        raise ValueError("no metric requested")
    return list(names)


@dataclass
class EvalSettings:
    metrics: list = field(default_factory=lambda: ["world_fid"])
    num_images: int = 500                   # for every metric without a fixed count
    # None: each run's own (generator.eval_temperatures, else eval_temperature: H.5's sweep)
    temperatures: list | None = field(default_factory=lambda: [1.0])
    seed: int = 0
    batch: int = 250
    images_per_prompt: int = 4              # GenEval
    geneval_prompts_per_task: int = 8       # GenEval-world
    geneval_results: Optional[str] = None   # GenEval: also write results.jsonl (official schema) here
    reference: Optional[str] = None         # npz with mu, sigma[, arr_0]; default: the ADM batch
    paths: dict = field(default_factory=dict)   # weights key -> explicit path
    test_time: Optional[dict] = None        # TestTime fields: also score TEST_TIME_METRICS with it


def reward_factory(name: str, device):
    """A differentiable real-network reward (HPS, PickScore, ImageReward) from staged weights: the
    ``reward_factory`` that training (trainers.state.build_context) and test-time scaling take."""
    from evaluators.networks.scorers import make_scorer
    from evaluators.networks.weights import set_offline_env

    set_offline_env()
    return make_scorer(name, device=device)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(folder: Path) -> torch.Tensor:
    """Every image under ``folder`` (sorted, RGB) as uint8 [N,3,H,W]; all must share one size."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"{folder}: images differ in size; resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] float in [0,1] -> uint8, rounding (the documented choice; truncation differs ≪ 0.01 FID)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class Student:
    """What a checkpoint needs to generate: its config, teacher adapter, EMA generator and world."""
    cfg: object
    teacher: object
    net: torch.nn.Module
    world: object                       # None for a real teacher
    track: str
    prompts: list = field(default_factory=list)   # a real text teacher's prompts (data.captions)
    teacher_steps: int = 0              # > 0: generate with the teacher's own sampler (baselines)
    teacher_cfg: float = 1.0


def load_student(checkpoint: Path, device: torch.device) -> Student:
    from omegaconf import OmegaConf

    from trainers.checkpoint import load_generator, read_meta
    from trainers.config import Config
    from trainers.state import build_context

    meta = read_meta(checkpoint)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), meta["config"]))
    cfg.train.device = device.type
    ctx = build_context(cfg, progress=False, rewards=False)
    track = "c2i" if ctx.teacher.conditioning == "class" else "t2i"
    return Student(cfg, ctx.teacher, load_generator(ctx.teacher, checkpoint, ctx.device), ctx.world,
                   track, list(ctx.data.captions) if track == "t2i" else [])


class Evaluator:
    """Scorer networks loaded once; ``evaluate`` many checkpoints with the same settings."""

    def __init__(self, settings: EvalSettings, device: str | torch.device = "cpu", progress: bool = False):
        self.settings = settings
        check_metrics(settings.metrics)
        self.device = torch.device(device)
        self.progress = progress
        self._scorers: dict = {}
        self._inception = None
        self._reference = None
        self._geneval = None
        self._tts_seconds: list = []
        self.check_weights()

    def check_weights(self) -> None:
        """Fail before any generation if a staged file is missing (WeightsMissing names it)."""
        from evaluators.networks.weights import resolve

        tt = self.settings.test_time or {}
        # reward "clip" is the world's own CLIP on the world (checked when a real teacher uses it)
        rewards = [r for r in (*tt.get("rewards", {}), *tt.get("select", {})) if r != "clip"]
        for metric in [*self.settings.metrics, *rewards]:
            for key in WEIGHTS_NEEDED.get(metric, ()):
                explicit = self.settings.paths.get(key)
                if key == "adm_ref" and self.settings.reference:
                    explicit = self.settings.reference
                    if Path(explicit).is_dir():      # reference images: statistics made here
                        continue
                resolve(key, explicit)

    # lazily built networks: an actor pays only for the metrics it is asked for
    def scorer(self, name: str):
        if name not in self._scorers:
            from evaluators.networks.scorers import make_scorer

            self._scorers[name] = make_scorer(name, device=self.device, **self._paths_for(name))
        return self._scorers[name]

    def _paths_for(self, name: str) -> dict:
        keys = {"clip": {"path": "clip_g14"}, "hps": {"path": "hps_v2"}, "hps_v21": {"path": "hps_v21"},
                "pickscore": {"path": "pickscore", "processor": "pickscore_proc"},
                "imagereward": {"path": "imagereward", "med_config": "imagereward_med",
                                "vocab": "bert_vocab"}}[name]
        return {arg: self.settings.paths[key] for arg, key in keys.items() if key in self.settings.paths}

    def inception(self):
        if self._inception is None:
            from evaluators.networks.inception import load_inception

            self._inception = load_inception(self.settings.paths.get("inception"), device=self.device)
        return self._inception

    def reference(self):
        """(mu, sigma, reference pool3 features or None) of the FID reference batch."""
        if self._reference is None:
            from evaluators.metrics.fid import load_reference_stats
            from evaluators.networks.weights import resolve

            from evaluators.metrics.fid import feature_statistics
            from evaluators.metrics.image_metrics import load_reference_images

            ref = self.settings.reference
            if ref and Path(ref).is_dir():   # user images, e.g. COCO-30k or MJHQ-30k: stats made here
                feats = self._pool3(load_image_folder(Path(ref)))[0]
                mu, sigma = feature_statistics(feats)
            else:
                path = resolve("adm_ref", ref or self.settings.paths.get("adm_ref"))
                mu, sigma, _ = load_reference_stats(path)
                feats = None
                if "prdc" in self.settings.metrics:
                    feats = self._pool3(load_reference_images(path))[0]
            self._reference = (mu, sigma, feats)
        return self._reference

    def _pool3(self, images_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        net, pools, logits = self.inception(), [], []
        with torch.no_grad():
            for start in range(0, images_u8.shape[0], 100):
                out = net(images_u8[start:start + 100].to(self.device))
                pools.append(out["pool3"].double().cpu())
                logits.append(out["logits_unbiased"].double().cpu())
        return torch.cat(pools).numpy(), torch.cat(logits).numpy()

    # generation
    def _conditions(self, student: Student, n: int) -> tuple[list, list]:
        """n fixed conditions and the prompt of each (class name or caption)."""
        from evaluators.metrics.world_eval import eval_conditions
        from softdimo.world.scenes import class_names

        if student.track == "c2i":
            names = class_names() if student.world is not None else [
                f"class {i}" for i in range(student.teacher.num_classes)]
            conds = eval_conditions(student.teacher, n, len(names), [])
            return conds, [names[c] for c in conds]
        # the world's held-out captions; a real teacher's own prompt list (data.captions)
        captions = student.world.reference("t2i").captions if student.world is not None else student.prompts
        conds = eval_conditions(student.teacher, n, 1, captions)
        return conds, list(conds)

    def generate(self, student: Student, conds: list, temperature: float | None) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1]: one-step samples at ``temperature``, or with
        ``temperature=None`` test-time-scaled ones (settings.test_time) for prompts ``conds``."""
        from evaluators.metrics.world_eval import generate_images, student_sampler

        if temperature is None:
            return self._test_time(student, conds).images
        g, t = student.cfg.generator, student.teacher
        if student.teacher_steps:
            from evaluators.metrics.world_eval import teacher_sampler

            sample = teacher_sampler(t, student.teacher_steps, student.teacher_cfg, temperature,
                                     t.sampling["randomize"])
        else:
            sample = student_sampler(t, student.net, g.init_mask_ratio, g.embed_noise, temperature)
        return generate_images(sample, student.teacher, conds, self.settings.seed,
                               batch=self.settings.batch, device=self.device,
                               progress=self.progress, desc=f"sampling T={temperature:g}")

    # metrics
    def _test_time(self, student: Student, prompts: list):
        from evaluators.scaled_sampling import generate_scaled, settings_of

        run = generate_scaled(student, prompts, settings_of(self.settings.test_time), self.settings.seed,
                            self.device, self.progress, reward_factory=lambda name, _: self.scorer(name))
        self._tts_seconds.append((len(prompts), run.seconds_per_prompt))
        return run

    def _score_metrics(self, student: Student, temperature: float | None, metrics=None) -> dict:
        s, out, cache = self.settings, {}, {}

        def images_for(n: int):
            if n not in cache:
                conds, prompts = self._conditions(student, n)
                cache[n] = (to_uint8(self.generate(student, conds, temperature)), prompts)
            return cache[n]

        for metric in metrics or s.metrics:
            if metric in WORLD_METRICS and student.world is None:
                raise ValueError(f"{metric} needs the embedded world; a real teacher uses fid5k, "
                                 "fid50k, is, prdc, clip, hps, ... (evaluators.suite.METRICS)")
            if metric == "geneval_world":
                out.update(self._geneval_world(student, temperature))
                continue
            if metric == "geneval":
                out.update(self._geneval_official(student, temperature))
                continue
            images, prompts = images_for(FIXED_COUNTS.get(metric, s.num_images))
            if metric == "world_fid":
                from evaluators.metrics.world_eval import world_fid

                ref = student.world.reference(student.track).images
                out[metric], out[f"{metric}_se"] = world_fid(student.world.features, images, ref,
                                                             device=self.device, with_se=True)
            elif metric == "world_clip":
                out[metric] = self._mean_score(student.world.clip_score, images, prompts)
            elif metric in SCORE_METRICS:
                out[metric] = self._mean_score(self.scorer(metric), images, prompts)
            else:
                out.update(self._inception_metric(metric, images))
        return out

    def _mean_score(self, scorer, images_u8: torch.Tensor, prompts: list) -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, images_u8.shape[0], self.settings.batch):
                x = images_u8[start:start + self.settings.batch].to(self.device).float() / 255
                total += float(scorer(x, prompts[start:start + self.settings.batch]).double().sum())
        return total / images_u8.shape[0]

    def _inception_metric(self, metric: str, images_u8: torch.Tensor) -> dict:
        from evaluators.metrics.fid import feature_statistics, frechet_distance
        from evaluators.metrics.image_metrics import inception_score, prdc

        if metric == "fid30k":
            return {metric: self._clean_fid30k(images_u8)}
        pool3, logits = self._pool3(images_u8)
        if metric == "is":
            return {"is": float(inception_score(logits)[0])}
        mu_r, sigma_r, ref_feats = self.reference()
        if metric == "prdc":
            fake = torch.from_numpy(pool3).float()
            real = torch.from_numpy(ref_feats).float()
            return {k: float(v) for k, v in prdc(real, fake, k=3, k_dc=5).items()}
        mu, sigma = feature_statistics(pool3)
        return {metric: float(frechet_distance(mu, sigma, mu_r, sigma_r))}

    def _clean_fid30k(self, images_u8: torch.Tensor) -> float:
        """H.5's FID-30k: clean-fid, clean mode, against --reference (folder or npz; required)."""
        from evaluators.metrics import clean_fid

        if not self.settings.reference:
            raise ValueError("fid30k needs --reference: clean-fid statistics (npz with mu, sigma) "
                             "or a folder of real images (e.g. COCO-2014 val at 256 px)")
        if getattr(self, "_clean", None) is None:     # (extractor, reference statistics), once
            net = clean_fid.load_extractor(self.settings.paths.get("clean_fid_inception"), self.device)
            self._clean = (net, clean_fid.reference_statistics(self.settings.reference, net, self.device))
        net, stats = self._clean
        return clean_fid.fid30k(images_u8, self.settings.reference, net, self.device, stats)

    def _geneval_world(self, student: Student, temperature: float) -> dict:
        from evaluators.geneval.world import evaluate_world_images, world_metadata

        if student.track != "t2i":
            raise ValueError("geneval_world needs a text-to-image checkpoint")
        meta = world_metadata(student.world, self.settings.geneval_prompts_per_task, self.settings.seed)
        prompts = [m["prompt"] for m in meta for _ in range(self.settings.images_per_prompt)]
        images = to_uint8(self.generate(student, prompts, temperature))
        return _geneval_values("geneval_world",
                               evaluate_world_images(meta, images, self.settings.images_per_prompt))

    def _geneval_official(self, student: Student, temperature: float) -> dict:
        """GenEval on the official metadata, detected by the HF Mask2Former (not mmdet: labelled)."""
        from evaluators.geneval.detectors import Mask2FormerDetector
        from evaluators.geneval.official import ClipColourClassifier, evaluate_images, load_metadata

        if student.track != "t2i":
            raise ValueError("geneval needs a text-to-image checkpoint")
        if self._geneval is None:
            p = self.settings.paths
            self._geneval = (load_metadata(p.get("geneval_meta")),
                             Mask2FormerDetector.from_pretrained(p.get("mask2former"), device=self.device),
                             ClipColourClassifier.from_weights(p.get("clip_l14"), device=self.device))
        meta, detector, colours = self._geneval
        ipp = self.settings.images_per_prompt
        images = to_uint8(self.generate(student, [m["prompt"] for m in meta for _ in range(ipp)],
                                        temperature))
        rows = evaluate_images(meta, images, ipp, detector, colours)
        if self.settings.geneval_results:
            from evaluators.geneval.results import write_results

            write_results(rows, self.settings.geneval_results)
        return _geneval_values("geneval", rows)

    def evaluate_teacher(self, cfg, steps: int, guidance: float | None = None) -> dict:
        """The same metrics for the teacher of config ``cfg`` sampled with its own multi-step
        sampler (``steps`` steps, CFG ``guidance``, default the teacher's published one): the
        baselines of the paper's Tables 2 and 11."""
        from trainers.state import build_context

        ctx = build_context(cfg, progress=False, rewards=False)
        guidance = ctx.teacher.sampling["cfg"] if guidance is None else guidance
        track = "c2i" if ctx.teacher.conditioning == "class" else "t2i"
        student = Student(cfg, ctx.teacher, None, ctx.world, track,
                          list(ctx.data.captions) if track == "t2i" else [], steps, guidance)
        return self._evaluate(student)

    def evaluate(self, checkpoint: str | Path) -> dict:
        """{"eval/<metric>": value, ..., "eval/temperature": best T} for one checkpoint."""
        return self._evaluate(load_student(Path(checkpoint), self.device))

    def _evaluate(self, student: Student) -> dict:
        primary = self.settings.metrics[0]
        best, best_key = None, math.inf
        per_t = {}
        temperatures = self.settings.temperatures
        if temperatures is None:
            from trainers.config import eval_temperatures

            temperatures = [1.0] if student.teacher_steps else eval_temperatures(student.cfg.generator)
        for t in temperatures:
            values = self._score_metrics(student, float(t))
            per_t[f"eval/{primary}/T{float(t):g}"] = values[primary]
            key = values[primary] if primary in LOWER_IS_BETTER else -values[primary]
            if best is None or key < best_key:
                best, best_key, best_t = values, key, float(t)
        out = {f"eval/{k}": float(v) for k, v in best.items()}
        out["eval/temperature"] = best_t
        if len(temperatures) > 1:
            out.update(per_t)
        tts_metrics = [m for m in self.settings.metrics if m in TEST_TIME_METRICS]
        if self.settings.test_time and tts_metrics and student.track == "t2i":   # c2i: no prompts
            self._tts_seconds = []
            values = self._score_metrics(student, None, tts_metrics)
            out.update({f"eval/tts/{k}": float(v) for k, v in values.items()})
            images = sum(n for n, _ in self._tts_seconds)
            out["eval/tts/seconds_per_prompt"] = sum(n * t for n, t in self._tts_seconds) / images
        return out
