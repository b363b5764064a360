"""Checks every single value gets, wherever it came from: no control characters in strings,
finite numbers that fit in 64 bits, a run directory that SLURM log paths can carry, and the
model's architecture numbers (read from its config.json) validated like recipe values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.config.errors import Problem
from launcher.config.schema import ModelSection

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators YAML treats as line breaks.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_problem(key: str, value: str, allowed: str = "") -> Problem | None:
    """Newline, NUL, escape and every other control character (YAML's line breaks included)
    break scripts, logs and paths: refused in every string except the characters in `allowed`."""
    bad = next((ch for ch in CONTROL.findall(value) if ch not in allowed), None)
    if bad is None:
        return None
    return Problem(key, f"contains the control character {bad!r}", "write it on one line, without control characters")


def check_run_dir(run_dir: str, key: str) -> list[Problem]:
    """The run directory reaches `#SBATCH --output=` lines and scripts: one plain line."""
    problem = control_problem(key, run_dir)
    if problem is not None:
        return [problem]
    return [
        Problem(key, f"contains {ch!r}, which SLURM log paths cannot carry", "choose a path without it")
        for ch in ('"', "%", "\\")
        if ch in run_dir
    ]


# Our architecture field -> the key in a Hugging Face config.json.
ARCH_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


def check_model_numbers(model: ModelSection, explicit: set[str]) -> list[Problem]:
    """The resolved architecture numbers, wherever they were read from, checked like recipe
    values; a value that came from the model's config.json is reported under that file and key."""
    config_file = Path(model.name_or_path).expanduser() / "config.json"
    problems: list[Problem] = []
    for ours, theirs in ARCH_KEYS.items():
        value: Any = getattr(model, ours)
        if value is None:
            continue  # resolve reported it
        from_file = f"model.{ours}" not in explicit and config_file.is_file()
        key = f"{config_file}: {theirs}" if from_file else f"model.{ours}"
        fix = f"fix the model's config.json, or set model.{ours} in the recipe" if from_file else f"set model.{ours} to a positive integer"
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(key, f"{value!r} is not a whole number", fix))
        elif not 1 <= value <= 2**31:
            problems.append(Problem(key, f"{value} is outside 1 to 2**31", fix))
    tie = model.tie_word_embeddings
    if tie is not None and not isinstance(tie, bool):
        problems.append(Problem(f"{config_file}: tie_word_embeddings", f"{tie!r} is not true or false", "fix the model's config.json"))
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if not problems and heads is not None and kv_heads is not None and heads % kv_heads:
        key = (
            "model.num_key_value_heads"
            if "model.num_key_value_heads" in explicit or not config_file.is_file()
            else f"{config_file}: num_key_value_heads"
        )
        problems.append(Problem(key, f"{kv_heads} does not divide num_attention_heads {heads}", "use a divisor of the attention heads"))
    return problems


def numbers(obj: Any, prefix: str = "") -> Iterator[Problem]:
    """NaN and infinity pass every `<` comparison: refused for every float key; ints fit int64."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from numbers(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            yield Problem(key, f"{value} is not a finite number", "give a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            yield Problem(key, f"{value} does not fit in 64 bits", "give a smaller number")


def null_problem(key: str, hint: Any, fix: str) -> Problem | None:
    """`key: null` (or `key=null`) for a key that has no null: refused naming the key, never
    read as its default. An optional key's null is its "unset" (derived, or read from the model)."""
    if type(None) in typing.get_args(hint):
        return None
    return Problem(key, "is null, which this key cannot be", f"remove the key, or {fix}")


def unset_length(max_steps: int | None, epochs: float | None, nulls: set[str], default: int) -> list[Problem]:
    """An explicit null for train.max_steps (or train.epochs) that leaves neither set would silently
    train the default number of steps; null beside the other one set clears an inherited value."""
    if max_steps is not None or epochs is not None:
        return []
    return [
        Problem(key, f"is null, which would silently mean the default {default} steps", "remove the key, or give a number")
        for key in ("train.max_steps", "train.epochs")
        if key in nulls
    ]
