"""Derived recipe values, filled in once so that config.yaml and plan.json hold no blanks.

- model architecture numbers: from the tiny spec, or `name_or_path/config.json` for a local model;
- batch settings: micro_batch_size x gradient_accumulation_steps x data-parallel size =
  global_batch_size, any one derived from the others (the only copy of this arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import DataSection, ModelSection, RunConfig, TrainSection

TINY_MODEL = "tiny-llama"

# The tiny Llama built offline for CPU mode (runtime/tiny.py builds exactly this).
TINY_LLAMA = {
    "hidden_size": 128,
    "num_layers": 4,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}

# Hugging Face config.json key for each of our architecture fields.
_HF_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}


def data_parallel_size(cfg: RunConfig) -> int:
    """Ranks that each see different data: every rank, since there is no tensor/pipeline split."""
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill in derived values; raise ConfigError naming every value that cannot be derived."""
    problems: list[Problem] = []
    model, train, data = cfg.model, cfg.train, cfg.data
    try:
        model = resolve_model(dataclasses.replace(cfg.model, name_or_path=local_path(cfg.model.name_or_path, "model.name_or_path")))
    except ConfigError as exc:
        problems += exc.problems
    try:
        data = resolve_data(cfg.data)
    except ConfigError as exc:
        problems += exc.problems
    if data_parallel_size(cfg) >= 1:  # otherwise check_fields has reported cluster.nodes/gpus_per_node
        try:
            train = resolve_batch(cfg.train, data_parallel_size(cfg))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, model=model, train=train, data=data)


_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def local_path(value: str, key: str, must_be_local: bool = False) -> str:
    """An existing local path → absolute; a path-looking value that does not exist → error; else as is.

    Values that are neither (`tiny-llama`, `org/name` Hub ids) pass through unchanged.
    """
    if not value:
        return value
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    looks_local = must_be_local or value.startswith(("/", "./", "../", "~")) or value.endswith(_FILE_SUFFIXES)
    if looks_local:
        raise ConfigError([Problem(key, f"{value} does not exist", "check the path (relative paths are from the current directory)")])
    return value


def resolve_data(data: DataSection) -> DataSection:
    problems: list[Problem] = []
    path, val_path = data.path, data.val_path
    try:
        path = local_path(data.path, "data.path", must_be_local=data.format not in ("auto", "hub"))
    except ConfigError as exc:
        problems += exc.problems
    try:
        val_path = local_path(data.val_path, "data.val_path")
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(data, path=path, val_path=val_path)


def resolve_model(model: ModelSection) -> ModelSection:
    known: dict[str, object] = {}
    if model.name_or_path == TINY_MODEL:
        known = dict(TINY_LLAMA)
    else:
        config_file = Path(model.name_or_path).expanduser() / "config.json"
        if config_file.is_file():
            try:
                hf = json.loads(config_file.read_text())
            except (OSError, ValueError):
                raise ConfigError(
                    [Problem("model.name_or_path", f"{config_file} is not readable JSON", "point at a Hugging Face model directory")]
                ) from None
            known = {ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf}
            known.setdefault("num_key_value_heads", known.get("num_attention_heads"))
            known.setdefault("tie_word_embeddings", False)
    filled = {name: value for name, value in known.items() if getattr(model, name) is None}
    model = dataclasses.replace(model, **filled)  # type: ignore[arg-type]
    if model.num_key_value_heads is None and model.num_attention_heads is not None:
        model = dataclasses.replace(model, num_key_value_heads=model.num_attention_heads)
    if model.tie_word_embeddings is None:
        model = dataclasses.replace(model, tie_word_embeddings=False)
    missing = [name for name in _HF_KEYS if getattr(model, name) is None]
    if missing:
        raise ConfigError(
            [
                Problem(
                    f"model.{name}",
                    f"unknown for {model.name_or_path!r} (not a local model directory with a config.json)",
                    f"set model.{name} in the recipe, or point model.name_or_path at a local directory",
                )
                for name in missing
            ]
        )
    return model


def resolve_batch(train: TrainSection, dp: int) -> TrainSection:
    """Fill in whichever of micro batch, accumulation and global batch the recipe left out."""
    micro, accum, total = train.micro_batch_size, train.gradient_accumulation_steps, train.global_batch_size
    for key, value in (("micro_batch_size", micro), ("gradient_accumulation_steps", accum), ("global_batch_size", total)):
        if value is not None and value < 1:
            raise ConfigError([Problem(f"train.{key}", f"{value} is less than 1", "use a positive integer")])
    if total is None:
        micro, accum = micro or 1, accum or 1
        total = micro * accum * dp
    elif micro is None and accum is None:
        micro = 1
    if micro is None:
        assert accum is not None
        micro, rest = divmod(total, accum * dp)
        if rest or micro < 1:
            raise _batch_error(total, f"is not a multiple of gradient_accumulation_steps {accum} x data-parallel {dp}", accum * dp)
    elif accum is None:
        accum, rest = divmod(total, micro * dp)
        if rest or accum < 1:
            raise _batch_error(total, f"is not a multiple of micro_batch_size {micro} x data-parallel {dp}", micro * dp)
    if micro * accum * dp != total:
        raise _batch_error(
            total, f"!= micro_batch_size {micro} x gradient_accumulation_steps {accum} x data-parallel {dp}", micro * accum * dp, exact=True
        )
    return dataclasses.replace(train, micro_batch_size=micro, gradient_accumulation_steps=accum, global_batch_size=total)


def _batch_error(total: int, what: str, multiple: int, exact: bool = False) -> ConfigError:
    fix = f"set it to {multiple}" if exact else f"set it to a multiple of {multiple}"
    return ConfigError(
        [
            Problem(
                "train.global_batch_size",
                f"{total} {what} (data-parallel = cluster.nodes x cluster.gpus_per_node)",
                f"{fix}, or leave one of the three batch keys out to have it derived",
            )
        ]
    )
