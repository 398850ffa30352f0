"""Sweep files: loading, validation and the expansion into trials (no Ray here).

A sweep file names a preset, dotted training-config overrides (``base``) and a ``search`` of one
sampler per key; ``arms`` are named override sets, each crossed with the search; a ``student``
section adds the two-stage recipe's first stage (one student per training seed, see
``StudentSection``). ``load_sweep`` resolves and validates every trial's full training config before
anything runs, so a typo or an out-of-range value costs one line of error, not a cluster start.
Each problem is a ``UserError`` "<sweep file>: <key>: <problem>".
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from orchestrator.config import (UserError, assign, check_files, key_problem, load_yaml, merge_checked,
                                 parse_value, split_override, to_dict, validated)
from softdimo.teachers import TeacherFilesMissing
from orchestrator.sweeping.checks import NAME_PATTERN, check_eval_weights, check_file  # noqa: F401 (re-exported)
from orchestrator.sweeping.layout import SweepLayout
from orchestrator.sweeping.schema import StudentSection, SweepFile, SweepSpec, Trial, storage_of
from orchestrator.sweeping.storage import SCHEME, is_remote
from trainers.config import Config, ConfigValueError, check_values

SAMPLERS = ("grid", "choice", "uniform", "loguniform")
MAX_TRIALS = 10_000      # the expansion is held in memory and printed by the dry run
# Set by the sweep for every trial: a value from the file would be silently replaced.
RESERVED = {"output_dir": "set per trial to <sweep_dir>/trials/<key>",
            "train.device": "set from scaling.use_gpu (override sweep.scaling.use_gpu instead)"}


def load_sweep(path: str | Path, overrides: Sequence[str] = (), cwd: Path | None = None) -> SweepSpec:
    """Load, validate and expand a sweep file; ``sweep.*`` overrides edit the file itself, the
    others are training-config overrides applied to every trial before its search values."""
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    source = str(path)
    file_path = Path(path).expanduser()
    file_path = file_path if file_path.is_absolute() else cwd / file_path
    items = [(item, *split_override(item, source)) for item in overrides]
    sweep_items = [(item, key, value) for item, key, value in items if key.startswith("sweep.")]
    train_items = [(item, key, value) for item, key, value in items if not key.startswith("sweep.")]

    file = _load_file(file_path, sweep_items, source)
    check_file(file, source)
    preset = Path(file.preset).expanduser()
    preset = (preset if preset.is_absolute() else file_path.parent / preset).resolve()
    if not preset.is_file():
        raise UserError(f"{source}: preset: {preset} not found")
    if is_remote(file.output_dir):
        if not file.output_dir[len(SCHEME):].strip("/"):
            raise UserError(f"{source}: output_dir: {file.output_dir!r} names no bucket (s3://bucket/prefix)")
    elif "://" in file.output_dir:
        raise UserError(f"{source}: output_dir: {file.output_dir!r}: a folder or s3://bucket/prefix")
    else:
        file.output_dir = str(_absolute(file.output_dir, cwd))
    if file.storage.scratch_dir:
        file.storage.scratch_dir = str(_absolute(file.storage.scratch_dir, cwd))
    for folder, what in ((storage_of(file).local, "output_dir"),
                         (storage_of(file).local / file.name, "name")):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{source}: {what}: {folder} is an existing file, not a folder")
    samplers = {key: _sampler(key, spec, source) for key, spec in file.search.items()}
    count = file.num_samples * math.prod(len(v) for kind, v in samplers.values() if kind == "grid")
    if count > MAX_TRIALS:
        raise UserError(f"{source}: num_samples: {count} trials (num_samples {file.num_samples} x "
                        f"the grid) is more than {MAX_TRIALS}; split the sweep")
    for item, key, _ in train_items:
        for search_key in samplers:
            if key == search_key or key.startswith(search_key + "."):
                raise UserError(f"{source}: search.{search_key}: also set by the override {item}; "
                                "remove one")

    layers = _Layers(file, source, cwd, train_items).load(preset)
    if file.student is not None:
        _check_init(file, layers, source)
    for key, (kind, values) in samplers.items():
        problem = _key_problem(layers.common, key)
        if problem:
            raise UserError(f"{source}: search.{key}: {problem}")
        if kind in ("uniform", "loguniform"):  # draws lie between the bounds: check both ends
            for bound in values:
                layers.resolve("bounds", {key: bound})

    _check_arms(file, samplers, source)
    spec = SweepSpec(source=source, file=file, preset=str(preset), trials=[])
    expanded = _expand(samplers, file.num_samples, file.search_seed)
    arms = list(file.arms.items()) or [(None, {})]
    if len(arms) * len(expanded) > MAX_TRIALS:
        raise UserError(f"{source}: arms: {len(arms)} arms x {len(expanded)} search trials is more "
                        f"than {MAX_TRIALS}; split the sweep")
    for index, (arm, values) in enumerate((arm, values) for arm in arms for values in expanded):
        key = f"t{index:03d}"
        config, chosen = layers.resolve(key, values, arm=arm)
        spec.trials.append(Trial(key=key, overrides=chosen, label=_label(chosen), config=config))
    if file.student is not None:
        _add_students(spec, layers)
    return spec


def _check_arms(file: SweepFile, samplers: dict, source: str) -> None:
    """Arm names are folder-safe labels; an arm may not set a key the search also sets."""
    for name, values in file.arms.items():
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"{source}: arms.{name}: an arm's name may only use letters, digits, _ . -")
        if not isinstance(values, dict):
            raise UserError(f"{source}: arms.{name}: needs a mapping of dotted keys to values, got {values!r}")
        for key in values:
            for search_key in samplers:
                if key == search_key or key.startswith(search_key + ".") or search_key.startswith(key + "."):
                    raise UserError(f"{source}: arms.{name}.{key}: also set by search.{search_key}; remove one")


def _check_init(file: SweepFile, layers: "_Layers", source: str) -> None:
    """With a student section, init.checkpoint is the sweep's to set (before any trial resolves)."""
    init_keys = [k for k in file.search if k == "init" or k.startswith("init.")]
    if init_keys or layers.common.init.checkpoint is not None:
        where = (f"search.{init_keys[0]}" if init_keys
                 else "base.init.checkpoint" if "init.checkpoint" in file.base else "init.checkpoint")
        raise UserError(f"{source}: {where}: the student section sets every trial's init.checkpoint "
                        "to its seed's student; remove one")


def _add_students(spec: SweepSpec, layers: "_Layers") -> None:
    """The two-stage recipe: one student per distinct training seed of the trials (in trial
    order), and each trial's ``init.checkpoint`` pinned to its seed's student's final checkpoint
    (a path known before the student runs, so ``--resume`` compares the same configs)."""
    source, overrides = spec.source, spec.file.student.overrides
    if "seed" in overrides:
        raise UserError(f"{source}: student.overrides.seed: a student's seed is its trials' seed "
                        "(one student per seed); remove it")
    for seed in dict.fromkeys(t.config["seed"] for t in spec.trials):
        key = spec.layout.student_key(seed)
        config, chosen = layers.resolve(key, {**overrides, "seed": seed}, layer="student.overrides")
        spec.students.append(Trial(key=key, overrides=chosen, label="student " + _label(chosen),
                                   config=config))
        final = str(spec.layout.final_checkpoint(key, config["train"]["steps"]))
        for trial in spec.trials:
            if trial.config["seed"] == seed:
                trial.config["init"]["checkpoint"] = final


# --- the sweep file -------------------------------------------------------------------------------

def _load_file(path: Path, items: list, source: str) -> SweepFile:
    cfg = merge_checked(OmegaConf.structured(SweepFile), load_yaml(path), source)
    for item, key, text in items:
        where = f"{source} (override {item})"
        key = key[len("sweep."):]
        value = parse_value(text, f"{where}: {key}")
        head, _, rest = key.partition(".")
        if key.startswith("student.overrides.") and len(key) > len("student.overrides."):
            if cfg.student is None:
                cfg.student = OmegaConf.structured(StudentSection)
            head, rest = "student.overrides", key[len("student.overrides."):]
            target = cfg.student.overrides
        elif head == "arms" and rest.count(".") >= 1:     # arms.<name>.<dotted key>
            name, rest = rest.split(".", 1)
            if name not in cfg.arms:
                cfg.arms[name] = {}
            target = cfg.arms[name]
        else:
            target = cfg[head] if head in ("base", "search") else None
        if target is not None and rest:
            # base, search and student.overrides map dotted training keys: "train.steps" is one
            # key there; null drops it
            if value is None:
                target.pop(rest, None)
            else:
                target[rest] = value
        else:
            for part in reversed(key.split(".")):
                value = {part: value}
            cfg = merge_checked(cfg, value, where)
    for required in ("name", "preset"):
        if OmegaConf.is_missing(cfg, required):
            raise UserError(f"{source}: {required}: missing (required)")
    return OmegaConf.to_object(cfg)


def _sampler(key: str, spec: Any, source: str) -> tuple[str, list]:
    where = f"{source}: search.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        got = ", ".join(map(str, spec)) if isinstance(spec, dict) else repr(spec)
        raise UserError(f"{where}: needs exactly one of {', '.join(SAMPLERS)}, got {got or 'nothing'}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
    if kind in ("uniform", "loguniform"):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numbers:
            raise UserError(f"{where}: {kind} needs [low, high], got {values}")
        if not values[0] < values[1]:
            raise UserError(f"{where}: {kind} needs low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise UserError(f"{where}: loguniform needs low > 0, got {values}")
    return kind, values


# --- training configs -----------------------------------------------------------------------------

def _key_problem(cfg: DictConfig, key: str) -> Optional[str]:
    return RESERVED.get(key) or key_problem(cfg, key)


def _assign(cfg: DictConfig, key: str, value: Any, where: str) -> None:
    problem = RESERVED.get(key)
    if problem:
        raise UserError(f"{where}: {problem}")
    assign(cfg, key, value, where)


@dataclass
class _Layers:
    """What every trial starts from (preset, then base, then the training overrides) and what
    each trial adds, remembered so that a bad value's message names the layer that set it."""
    file: SweepFile
    source: str
    cwd: Path
    train_items: list
    common: DictConfig = field(init=False)

    def load(self, preset: Path) -> "_Layers":
        cfg = merge_checked(OmegaConf.structured(Config), load_yaml(preset), str(preset))
        validated(cfg, str(preset))  # a bad preset is the preset's fault, not the sweep's
        for key, value in self.file.base.items():
            _assign(cfg, key, value, f"{self.source}: base.{key}")
        for item, key, text in self.train_items:
            where = f"{self.source} (override {item}): {key}"
            _assign(cfg, key, parse_value(text, where), where)
        self.common = cfg
        return self

    def resolve(self, key: str, values: dict, layer: str = "search",
                arm: tuple[str | None, dict] = (None, {})) -> tuple[dict, dict]:
        """A trial's validated config (plain dict) and its ``layer`` values (the search's, or a
        student's overrides) as the config holds them, led by ``arm`` (the arm's name) if any;
        the arm's own overrides go between the common layers and the search's values."""
        cfg = copy.deepcopy(self.common)
        arm_name, arm_values = arm
        for name, value in arm_values.items():
            _assign(cfg, name, value, f"{self.source}: arms.{arm_name}.{name}: value {_fmt(value)}")
        for name, value in values.items():
            _assign(cfg, name, value, f"{self.source}: {layer}.{name}: value {_fmt(value)}")
        chosen = {}
        for name in values:
            got = OmegaConf.select(cfg, name)
            chosen[name] = OmegaConf.to_container(got) if isinstance(got, (DictConfig, ListConfig)) else got
        cache = cfg.world.cache_dir
        # the trial's working folder (node-local scratch for an s3:// output_dir)
        trial_root = SweepLayout.of(storage_of(self.file).local, self.file.name).trial(key).root
        OmegaConf.update(cfg, "output_dir", str(trial_root))
        OmegaConf.update(cfg, "world.cache_dir", None if cache is None else str(_absolute(cache, self.cwd)))
        OmegaConf.update(cfg, "train.device", "cuda" if self.file.scaling.use_gpu else "cpu")
        obj = OmegaConf.to_object(cfg)
        try:
            check_values(obj)
            check_files(obj)
        except (ConfigValueError, TeacherFilesMissing) as err:
            raise UserError(self.blame(err, key, values, layer, arm)) from None
        return to_dict(obj), ({"arm": arm_name, **chosen} if arm_name is not None else chosen)

    def blame(self, err: ConfigValueError, key: str, values: dict, layer: str = "search",
              arm: tuple[str | None, dict] = (None, {})) -> str:
        """Name the last layer that set the bad key: search, then overrides, then base."""
        def related(name: str) -> bool:
            return err.key == name or err.key.startswith(name + ".") or name.startswith(err.key + ".")

        def reason(name: str) -> str:
            return err.message if err.key == name else f"{err.key}: {err.message}"

        for name, value in values.items():
            if related(name):
                return f"{self.source}: {layer}.{name}: value {_fmt(value)}: {reason(name)}"
        for name, value in arm[1].items():
            if related(name):
                return f"{self.source}: arms.{arm[0]}.{name}: value {_fmt(value)}: {reason(name)}"
        for item, name, _ in reversed(self.train_items):
            if related(name):
                return f"{self.source} (override {item}): {err.key}: {err.message}"
        for name in reversed(list(self.file.base)):
            if related(name):
                return f"{self.source}: base.{name}: {reason(name)}"
        # a combination of values (e.g. reward.weight > 0 without terms): name the trial
        return f"{self.source}: trial {key} ({_label(values)}): {err.key}: {err.message}"


def _absolute(path: str, cwd: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else cwd / p


# --- expansion ------------------------------------------------------------------------------------

def _expand(samplers: Dict[str, tuple], num_samples: int, seed: int) -> List[dict]:
    """Search values per trial: the grid product (last key fastest) repeated ``num_samples``
    times, random samplers drawn per trial in trial order from one seeded generator."""
    grid = {key: values for key, (kind, values) in samplers.items() if kind == "grid"}
    product = list(itertools.product(*grid.values()))
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(num_samples):
        for combo in product:
            fixed = dict(zip(grid, combo))
            trials.append({key: copy.deepcopy(fixed[key]) if key in fixed else _draw(rng, kind, values)
                           for key, (kind, values) in samplers.items()})
    return trials


def _draw(rng: np.random.Generator, kind: str, values: list) -> Any:
    if kind == "choice":
        return copy.deepcopy(values[int(rng.integers(len(values)))])
    low, high = float(values[0]), float(values[1])
    if kind == "uniform":
        return float(rng.uniform(low, high))
    # exp(log(x)) can land a rounding error outside the bounds
    return min(max(float(math.exp(rng.uniform(math.log(low), math.log(high)))), low), high)


def _label(values: dict) -> str:
    return " ".join(f"{key}={_fmt(value)}" for key, value in values.items()) or "base"


def _fmt(value: Any) -> str:
    """A short, override-like rendering of a value for labels and messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(float(f"{value:.4g}"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)
