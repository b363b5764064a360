"""Recipe YAML (+ `base:` inheritance) + `a.b=c` overrides → a validated, resolved RunConfig.

Every unknown key and every wrong type is reported (not just the first), each as one line naming
the key path. Cross-field rules are in `validate.py`; derived values in `resolve.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.config.errors import ConfigError, Problem
from launcher.config.resolve import resolve
from launcher.config.schema import RunConfig
from launcher.config.validate import check_combinations, check_fields

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


def load_config(recipe: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load, merge, resolve and validate a recipe; raise ConfigError listing every problem."""
    raw = read_recipe(Path(recipe))
    raw = merge_dicts(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any], user_written: bool = True) -> RunConfig:
    """Check a plain nested dict against the schema, then resolve and validate it.

    `user_written=False` for a dict that lists every key (a resolved config read back from
    plan.json): rules about keys a user set on purpose then do not apply.
    """
    problems = unknown_keys(raw, RunConfig, "")
    base = OmegaConf.structured(RunConfig)
    known = leaves(raw, RunConfig, "")
    good: dict[str, Any] = {}  # the known, well-typed leaves: later rules still run on these
    for path, value in known:
        good = merge_dicts(good, nest(path, value))
    try:
        OmegaConf.merge(base, good)  # the usual case: every value fits, one merge
    except (OmegaConfBaseException, TypeError, ValueError):
        good = {}  # find each value that does not fit, so that all are reported
        for path, value in known:
            try:
                OmegaConf.merge(base, nest(path, value))
                good = merge_dicts(good, nest(path, value))
            except (OmegaConfBaseException, TypeError, ValueError) as exc:  # OmegaConf raises TypeError for list-vs-dict
                problems.append(Problem(path, _first_line(exc), _type_fix(path)))
    try:
        merged = OmegaConf.merge(base, good)
        assert isinstance(merged, DictConfig)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "recipe"
        raise ConfigError([Problem(str(key), _first_line(exc), "a `${...}` value must name a recipe key; write a literal value")]) from None
    assert isinstance(cfg, RunConfig)
    explicit = {path for path, _ in leaves(good, RunConfig, "")} if user_written else set()
    problems += check_fields(cfg)
    try:
        cfg = resolve(cfg)
    except ConfigError as exc:
        problems += exc.problems
    problems += check_combinations(cfg, explicit)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # one line per problem, in order
    return cfg


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML recipe and the chain of `base:` recipes it inherits from."""
    if not path.is_file() and not path.is_absolute() and (RECIPE_DIR / path).is_file():
        path = RECIPE_DIR / path
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError([Problem("base", f"inheritance cycle {chain}", "remove one of the `base:` lines")])
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([Problem("recipe", f"cannot read {path} ({exc.strerror})", "check the path")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError([Problem("recipe", f"{path.name} is not valid YAML{at}", "fix the YAML syntax")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("recipe", f"{path.name} must be a mapping of sections", "start with e.g. `model:`")])
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([Problem("base", "must be a path to another recipe", "write `base: other.yaml`")])
    parent = read_recipe(path.parent / base if not Path(base).is_absolute() else Path(base), (*_seen, path))
    return merge_dicts(parent, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings → nested dict; values are parsed as YAML (so `4`, `true`, `[a, b]` work)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([Problem(key or item, f"override {item!r} is not key=value", "write e.g. train.max_steps=100")])
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out = merge_dicts(out, nest(key, value))
    return out


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `top` replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def nest(path: str, value: Any) -> dict[str, Any]:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def _section_type(schema: type, name: str) -> type | None:
    """The dataclass type of field `name` of `schema`, or None if it is a leaf."""
    hint = typing.get_type_hints(schema)[name]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def unknown_keys(raw: Any, schema: type, prefix: str) -> list[Problem]:
    """Every key in `raw` that the schema does not have, with a did-you-mean."""
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return problems
    names = _fields(schema)
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(names)}"
            problems.append(Problem(path, "unknown key", hint))
            continue
        sub = _section_type(schema, key)
        if sub is not None:
            if isinstance(value, dict):
                problems += unknown_keys(value, sub, f"{path}.")
            elif value is not None:
                problems.append(Problem(path, f"must be a mapping of {', '.join(_fields(sub))}", "indent its keys under it"))
    return problems


def leaves(raw: Any, schema: type, prefix: str) -> list[tuple[str, Any]]:
    """(dotted path, value) for every known leaf in `raw`."""
    out: list[tuple[str, Any]] = []
    if not isinstance(raw, dict):
        return out
    names = _fields(schema)
    for key, value in raw.items():
        if key not in names:
            continue
        sub = _section_type(schema, key)
        if sub is not None and isinstance(value, dict):
            out += leaves(value, sub, f"{prefix}{key}.")
        elif sub is None:
            out.append((f"{prefix}{key}", value))
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _type_fix(path: str) -> str:
    schema: type = RunConfig
    parts = path.split(".")
    for part in parts[:-1]:
        schema = _section_type(schema, part) or schema
    hint = typing.get_type_hints(schema).get(parts[-1])
    return f"give a value of type {_type_name(hint)}"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "")
