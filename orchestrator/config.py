"""Load a YAML config onto the typed schema, apply ``key=value`` overrides and validate it.

Every problem becomes a ``UserError`` whose one-line message names the file and the key; the CLIs
print it and exit with code 2 before any work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
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
        key = _key_of(err)
        if key == "?" and isinstance(node, (dict, DictConfig)):
            key = _culprit(schema, node)   # e.g. "scheduler: fifo" where a section is expected
        raise UserError(f"{source}: {key}: {_reason(err)}") from None


def _culprit(schema: DictConfig, node) -> str:
    """The top-level key whose merge fails, when OmegaConf's error does not name one."""
    for key in node:
        try:
            OmegaConf.merge(schema, {key: node[key]})
        except OmegaConfBaseException:
            return str(key)
    return "?"


def split_override(item: str, source: str) -> tuple[str, str]:
    """``key=value`` -> (key, value text); anything else is a one-line UserError."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{source}: override {item!r} is not of the form key=value")
    return key.strip(), text


def parse_value(text: str, where: str) -> Any:
    """One override value parsed the way OmegaConf parses ``key=value`` (YAML)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as err:  # parse errors come in several types
        raise UserError(f"{where}: {str(err).splitlines()[0]}") from None


def key_problem(cfg: DictConfig, key: str) -> Optional[str]:
    """Why a dotted key does not name a value of ``cfg``, or None. Integer parts index lists
    (``reward.terms.1.weight``); a mapping field (``teacher.paths``) also takes new keys."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if isinstance(node, ListConfig):
            if not part.isdigit():
                return f"{where} is a list: {part!r} is not an index"
            if int(part) >= len(node):
                return f"index {part} out of range ({where} has {len(node)} items)"
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig):
            if part in node.keys():
                node = node._get_node(part)
            elif OmegaConf.get_type(node) is dict and depth == len(parts) - 1:
                return None
            else:
                return "not a key of the training config"
        else:
            return f"{where} is a single value, not a section"
    return None


def assign(cfg: DictConfig, key: str, value: Any, where: str) -> None:
    """Set one dotted key of ``cfg`` (types converted and checked by the schema)."""
    problem = key_problem(cfg, key)
    if problem:
        raise UserError(f"{where}: {problem}")
    try:  # update merges dicts into sections and converts types without warnings
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise UserError(f"{where}: {str(err).splitlines()[0]}") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str) -> DictConfig:
    """``key=value`` items onto ``cfg``: the one override engine (train CLI and sweep trials)."""
    for item in overrides:
        key, text = split_override(item, source)
        where = f"{source} (override {item}): {key}"
        assign(cfg, key, parse_value(text, where), where)
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
    if cfg.init.checkpoint:
        from trainers.checkpoint import resolve_checkpoint
        try:
            resolve_checkpoint(Path(cfg.init.checkpoint).expanduser())
        except FileNotFoundError as err:
            raise TeacherFilesMissing("init.checkpoint", str(err)) from None


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
