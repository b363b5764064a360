"""Recipe YAML (+ `base:` inheritance) + `a.b=c` overrides → a validated, resolved RunConfig.

Every unknown key and every wrong type is reported (not just the first), each as one line naming
the key path. Cross-field rules are in `validate.py`; derived values in `resolve.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.config.errors import ConfigError, Problem
from launcher.config.read import parse_override_value, parse_yaml, read_text
from launcher.config.resolve import DEFAULT_MAX_STEPS, resolve
from launcher.config.resolved import hints as _hints
from launcher.config.schema import RunConfig
from launcher.config.validate import check_combinations, check_fields
from launcher.config.values import check_model_numbers, control_problem, null_problem, unset_length

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
MAX_REPORTED = 20  # problem lines for unknown keys, at most


def load_config(recipe: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load, merge, resolve and validate a recipe; raise ConfigError listing every problem."""
    raw = read_recipe(Path(recipe))
    top = parse_overrides(overrides or [])
    cluster = top.get("cluster")
    if isinstance(cluster, dict) and "gpu" in cluster and "gpu_memory_gib" not in cluster and isinstance(raw.get("cluster"), dict):
        # `cluster.gpu=h200` on the command line names the GPU the job gets: its memory, not the
        # recipe's gpu_memory_gib (written for another GPU), is what the plan checks against
        raw = {**raw, "cluster": {k: v for k, v in raw["cluster"].items() if k != "gpu_memory_gib"}}
    raw = merge_dicts(raw, top)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any], user_written: bool = True) -> RunConfig:
    """Check a plain nested dict against the schema, then resolve and validate it.

    `user_written=False` for a dict that lists every key (a resolved config read back from
    plan.json): rules about keys a user set on purpose then do not apply.
    """
    problems = unknown_keys(raw, RunConfig, "")
    if len(problems) > MAX_REPORTED:  # a flood of unknown keys: the first ones say enough
        more = len(problems) - MAX_REPORTED
        problems = [*problems[:MAX_REPORTED], Problem("recipe", f"{more} more unknown keys", "fix the ones above first")]
    base = OmegaConf.structured(RunConfig)
    known = []
    for path, value in leaves(raw, RunConfig, ""):
        problem = _shape_problem(path, value) or _resolver_problem(path, value) or _null_problem(path, value)
        if problem is None:
            known.append((path, value))
        else:
            problems.append(problem)
    good: dict[str, Any] = {}  # the known, well-typed leaves: later rules still run on these
    for path, value in known:
        good = merge_dicts(good, nest(path, value))
    try:
        OmegaConf.merge(base, good)  # the usual case: every value fits, one merge
    except (OmegaConfBaseException, TypeError, ValueError):
        good = {}  # find each value that does not fit, so that all are reported
        for path, value in known:
            section, _, name = path.rpartition(".")
            try:
                OmegaConf.merge(_structured(_schema_at(section)), {name: value})  # one small section: fast
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
    if user_written:
        nulls = {path for path, value in known if value is None}
        problems += unset_length(cfg.train.max_steps, cfg.train.epochs, nulls, DEFAULT_MAX_STEPS)
    problems += check_fields(cfg)
    try:
        cfg = resolve(cfg)
    except ConfigError as exc:
        problems += exc.problems
    numbers = check_model_numbers(cfg.model, explicit)
    problems += numbers
    if not numbers:  # the cross-field rules compare these numbers: only once they are numbers
        problems += check_combinations(cfg, explicit)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # one line per problem, in order
    return cfg


def find_recipe(name: str, including: Path | None = None) -> Path:
    """The one lookup rule for the recipe argument and for `base:`: a relative path is taken from
    the including recipe's folder (for the argument: the working directory), then from the
    shipped recipes/ folder."""
    key = "base" if including is not None else "recipe"
    problem = control_problem(key, name)
    if problem is not None:
        raise ConfigError([problem])
    path = Path(name).expanduser()
    here = including.parent if including is not None else Path.cwd()
    candidates = [path] if path.is_absolute() else [here / path, RECIPE_DIR / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    where = f"{path}" if path.is_absolute() else f"{here} or in the shipped recipes {RECIPE_DIR}"
    raise ConfigError([Problem(key, f"{name} not found (looked in {where})", "give a path relative to that folder, or an absolute path")])


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML recipe and the chain of `base:` recipes it inherits from."""
    key = "base" if _seen else "recipe"
    if not _seen:
        path = find_recipe(str(path))
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError([Problem("base", f"inheritance cycle {chain}", "remove one of the `base:` lines")])
    if len(_seen) >= 16:
        raise ConfigError([Problem("base", f"more than 16 recipes inherit from each other ({path.name})", "shorten the `base:` chain")])
    data = parse_yaml(read_text(path, key), str(path))
    if data is None:
        raise ConfigError([Problem(str(path), "is empty (only comments or blank lines)", "write the recipe's sections, e.g. `model:`")])
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "must be a mapping of sections", "start with e.g. `model:`")])
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError([Problem("base", f"in {path.name} must be a path to another recipe", "write `base: other.yaml`")])
    parent = read_recipe(find_recipe(base, including=path), (*_seen, path))
    return merge_dicts(parent, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings → nested dict; values are parsed as YAML (so `4`, `true`, `[a, b]` work)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not part for part in parts) or len(parts) > 8 or control_problem("override", key):
            shown = ascii(key or item)[1:-1]
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigError([Problem(shown, "is not an override of the form key=value", "write e.g. train.max_steps=100")])
        out = merge_dicts(out, nest(key, parse_override_value(key, text)))
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
    hint = _hints(schema)[name]
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
            elif value is None:  # would drop every key a base recipe set there
                problems.append(Problem(path, "is null (a section with nothing under it)", "remove the line, or indent its keys under it"))
            else:
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


def _shape_problem(path: str, value: Any) -> Problem | None:
    """A list or mapping value must hold plain values: a list inside a list, or a mapping as an
    environment value, has no meaning here (and OmegaConf would let some through)."""
    schema: type = RunConfig
    parts = path.split(".")
    for part in parts[:-1]:
        schema = _section_type(schema, part) or schema
    hint = _hints(schema).get(parts[-1])
    origin = typing.get_origin(hint)
    scalar = (str, int, float, bool)
    if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return None  # a list of sections (data.datasets): OmegaConf checks each item's keys and types
    if origin is list and isinstance(value, list):
        bad = next((item for item in value if not isinstance(item, scalar)), None)
        if bad is not None:
            return Problem(path, f"holds {type(bad).__name__} {bad!r}; each item must be a plain value", "write a flat list, e.g. [a, b]")
    if origin is dict and isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return Problem(f"{path}.{name}", "is not a name", "use letters, digits and '_'")
            if not isinstance(item, scalar):
                return Problem(f"{path}.{name}", f"is a {type(item).__name__}; it must be a plain value", "write it as a string")
    return None


RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")  # `${oc.env:NAME}`, `${oc.decode:...}`: a resolver call


def _resolver_problem(path: str, value: Any) -> Problem | None:
    """A resolver would be evaluated here and its result (an HF_TOKEN, a password) written in clear
    into config.yaml, plan.json and the scripts: refused. `${section.key}` references stay allowed."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
    for name, item in items:
        if isinstance(item, str) and RESOLVER.search(item):
            key = f"{path}.{name}" if isinstance(value, dict) else path
            return Problem(
                key,
                f"{item!r} would be resolved and written in clear into the run directory",
                "leave secrets out of the recipe: export them in the shell (launcher run and sbatch pass the environment on)",
            )
    return None


def _null_problem(path: str, value: Any) -> Problem | None:
    section, _, name = path.rpartition(".")
    return null_problem(path, _hints(_schema_at(section))[name], _type_fix(path)) if value is None else None


def _schema_at(section: str) -> type:
    schema: type = RunConfig
    for part in filter(None, section.split(".")):
        schema = _section_type(schema, part) or schema
    return schema


@functools.cache
def _structured(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _type_fix(path: str) -> str:
    schema: type = RunConfig
    parts = path.split(".")
    for part in parts[:-1]:
        schema = _section_type(schema, part) or schema
    hint = _hints(schema).get(parts[-1])
    return f"give a value of type {_type_name(hint)}"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Union and any(typing.get_origin(a) is typing.Literal for a in typing.get_args(hint)):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))  # bool | Literal[...]: train.activation_checkpointing
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "")
