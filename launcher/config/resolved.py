"""A resolved config read back from plan.json → RunConfig, without OmegaConf or the validation.

`launcher plan` validated the config and wrote it with its digest (`digest`). A rank that finds
the digest unchanged (and the same launcher version) builds the dataclasses straight from the
dict: the validation and OmegaConf's import were about 0.3 s of CPU in every rank's start, before
its first step. Any other plan.json (edited by hand, or from another version) is validated again
in full (Plan.run_config).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from typing import Any

from launcher.config.schema import RunConfig


def digest(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@functools.cache
def hints(schema: type) -> dict[str, Any]:
    """A schema class's resolved annotations (resolving evaluates every string annotation again:
    uncached, it was half of a validation)."""
    return typing.get_type_hints(schema)


def build(schema: type, raw: dict[str, Any]) -> Any:
    """The dataclass `schema` from a dict holding exactly its fields (KeyError / TypeError otherwise)."""
    if not isinstance(raw, dict) or set(raw) != {f.name for f in dataclasses.fields(schema)}:
        raise KeyError(schema.__name__)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints(schema)[name]
        args = typing.get_args(hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = build(hint, value)
        elif typing.get_origin(hint) is list and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            values[name] = [build(args[0], item) for item in value]
        else:  # a leaf: a JSON scalar, list or mapping; copied so that the plan's dict stays its own
            values[name] = json.loads(json.dumps(value)) if isinstance(value, list | dict) else value
    return schema(**values)


def config_from_resolved(config: dict[str, Any]) -> RunConfig:
    out = build(RunConfig, config)
    assert isinstance(out, RunConfig)
    return out
