"""Load a YAML config onto the typed schema, apply ``key=value`` overrides and validate it.

Every problem becomes a ``UserError`` whose one-line message names the file and the key; the CLIs
print it and exit with code 2 before any work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softdimo.teachers import FAMILIES, TeacherFilesMissing, check_paths
from trainers.config import Config, ConfigValueError, check_values


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


def _key_of(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    return str(key) if key else "?"


def _reason(err: OmegaConfBaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return first.replace("Key '", "unknown key '") if type(err).__name__ == "ConfigKeyError" else first


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several types
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return node


def merge_checked(schema: DictConfig, node: DictConfig | dict, source: str) -> DictConfig:
    """Merge ``node`` onto a structured ``schema``; type and unknown-key errors name ``source``."""
    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as err:
        raise UserError(f"{source}: {_key_of(err)}: {_reason(err)}") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{source}: override {item!r} is not of the form key=value")
        try:
            node = OmegaConf.from_dotlist([item])
        except Exception as err:
            raise UserError(f"{source}: override {item!r}: {str(err).splitlines()[0]}") from None
        cfg = merge_checked(cfg, node, f"{source} (override {item})")
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The typed, validated config of a preset file plus overrides (a ``Config`` instance)."""
    node = load_yaml(path)
    cfg = merge_checked(OmegaConf.structured(Config), node, str(path))
    cfg = apply_overrides(cfg, overrides, str(path))
    return validated(cfg, str(path))


def validated(cfg: DictConfig, source: str) -> Config:
    """Range checks, then (real teachers) that every weight and data file exists: a preset whose
    files are absent stops here, before any work, naming the key and the path."""
    obj = OmegaConf.to_object(cfg)
    try:
        check_values(obj)
        check_files(obj)
    except (ConfigValueError, TeacherFilesMissing) as err:
        raise UserError(f"{source}: {err.key}: {err.message}") from None
    return obj


def check_files(cfg: Config) -> None:
    """TeacherFilesMissing for an absent teacher file (teacher.paths) or data file (data.*)."""
    if cfg.teacher.kind in FAMILIES:
        check_paths(cfg.teacher.kind, cfg.teacher.paths)
    for key in ("tokens", "captions", "prompts"):
        value = getattr(cfg.data, key)
        if value and not Path(value).expanduser().is_file():
            raise TeacherFilesMissing(f"data.{key}", f"{value} is not an existing file")


def to_dict(cfg: Config) -> dict:
    """A plain, JSON-able dict of a Config (what checkpoints and trackers record)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict, source: str) -> Config:
    return validated(merge_checked(OmegaConf.structured(Config), data, source), source)


def run_cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Run a CLI ``main``; a UserError is one line on stderr and exit code 2."""
    try:
        code = main(None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
