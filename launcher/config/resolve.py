"""Derived recipe values, filled in once so that config.yaml and plan.json hold no blanks.

- model architecture numbers: from the tiny spec, or `name_or_path/config.json` for a local model;
- batch settings: micro_batch_size x gradient_accumulation_steps x data-parallel size =
  global_batch_size, any one derived from the others (the only copy of this arithmetic).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from launcher.config.arch import CANONICAL, Architecture, architecture_of, moe_numbers, read_architecture
from launcher.config.errors import ConfigError, Problem
from launcher.config.modelfiles import config_problems, file_problems
from launcher.config.schema import DataSection, ModelSection, RunConfig, TrainSection

TINY_MODEL = "tiny-llama"
DEFAULT_MAX_STEPS = 1000

# The tiny Llama built offline for CPU mode (runtime/model/tiny.py builds exactly this).
TINY_LLAMA = {
    "hidden_size": 128,
    "num_layers": 4,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
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
    if train.max_steps is None and train.epochs is None:
        train = dataclasses.replace(train, max_steps=DEFAULT_MAX_STEPS)
    problems += _moe_lora_problems(cfg, model)
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


def model_config_file(name_or_path: str) -> Path | None:
    """config.json of a local model directory, or of a Hub id already in the local HF cache (no network)."""
    local = Path(name_or_path).expanduser() / "config.json"
    if local.is_file():
        return local
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # an id huggingface_hub refuses, or no cache: the shapes must come from the recipe
            return None
        return Path(cached) if isinstance(cached, str) else None
    return None


# The names checkpoints give each expert's projections (Mixtral's w1/w3/w2 in block_sparse_moe),
# which transformers 5 fuses on load: a LoRA target by those names matches no module.
_PER_EXPERT_NAMES = frozenset({"w1", "w2", "w3", "block_sparse_moe"})


def _moe_lora_problems(cfg: RunConfig, model: ModelSection) -> list[Problem]:
    """peft wraps a Mixture-of-Experts model's fused expert weights (3-D parameters, reached by
    all-linear or an `experts` target) in its ParamWrapper, which takes no dropout: refused here, not
    as peft's traceback on every rank."""
    lora = cfg.method.lora
    if not cfg.method.low_rank:
        return []
    experts = model.num_experts or 0  # resolved from config.json (resolve_model), or given for a model not on disk
    if experts < 2:
        return []
    problems = []
    per_expert = sorted(set(lora.target_modules) & _PER_EXPERT_NAMES)
    if per_expert:
        problems.append(
            Problem(
                "method.lora.target_modules",
                f"{', '.join(per_expert)} name per-expert weights of the checkpoint, which transformers fuses into one 3-D "
                f"parameter per layer (mlp.experts) in {model.architecture or 'this model'}: no module has that name",
                "use all-linear (peft then wraps the fused experts too) or the modules' own names (q_proj, ..., gate for the router)",
            )
        )
    if lora.dropout and any(t == "all-linear" or "experts" in t for t in lora.target_modules):
        problems.append(
            Problem(
                "method.lora.dropout",
                f"is {lora.dropout:g}, but {model.architecture or 'this model'} is a Mixture-of-Experts model ({experts} experts) and "
                "peft's LoRA on its fused expert weights takes no dropout",
                "set method.lora.dropout=0 (or leave the experts out of method.lora.target_modules)",
            )
        )
    return problems


def resolve_model(model: ModelSection) -> ModelSection:
    """Fill architecture numbers, model_type and the block class from the model's own config."""
    arch: Architecture | None = None
    if model.name_or_path == TINY_MODEL:
        arch = architecture_of("llama")
        known: dict[str, object] = {**TINY_LLAMA, "head_dim": None}
        architecture, layer_class = arch.model_type, arch.layer_class
    else:
        config_file = model_config_file(model.name_or_path)
        arch = read_architecture(config_file) if config_file is not None else None
        if config_file is not None and not model.local_dir and not Path(model.name_or_path).expanduser().is_dir():
            model = dataclasses.replace(model, local_dir=str(config_file.parent))  # the cached snapshot
        if arch is None and model.architecture:
            arch = architecture_of(model.architecture)
        known = dict(arch.numbers) if arch else {}
        architecture, layer_class = (arch.model_type, arch.layer_class) if arch else ("", "")
        if config_file is not None and arch is not None:
            known.update(moe_numbers(config_file))
    filled = {name: value for name, value in known.items() if getattr(model, name) is None}
    if arch is not None and arch.attn_softcap is not None and model.attn_logit_softcapping is None:
        filled["attn_logit_softcapping"] = arch.attn_softcap
    model = dataclasses.replace(model, **filled)  # type: ignore[arg-type]
    if model.num_key_value_heads is None and model.num_attention_heads is not None:
        model = dataclasses.replace(model, num_key_value_heads=model.num_attention_heads)
    if model.tie_word_embeddings is None:
        model = dataclasses.replace(model, tie_word_embeddings=False)
    problems: list[Problem] = []
    if arch is not None and arch.remote_code and not model.trust_remote_code:
        problems.append(
            Problem(
                "model.trust_remote_code",
                f"{arch.source} names its own modeling code (auto_map) for model_type {arch.model_type!r}, which transformers "
                "does not ship; that code runs on every rank only when trusted",
                f"set model.trust_remote_code: true if you trust the code in {Path(arch.source).parent}, or use a model transformers implements",
            )
        )
    if arch is not None and arch.source.endswith("config.json"):  # read from a file, not named in the recipe
        found = config_problems(arch)
        if Path(model.name_or_path).is_dir():  # a local directory: its files too (a Hub id is fetched by the run)
            found += file_problems(Path(model.name_or_path), arch)
        problems += [Problem("model.name_or_path", what, fix) for what, fix in found]
    if arch is not None and model.architecture and not arch.classes:
        problems.append(
            Problem(
                "model.architecture",
                f"{model.architecture!r} is not a model type transformers knows",
                "use the config's model_type, e.g. llama",
            )
        )
    if model.layer_class and arch is not None and arch.classes and model.layer_class not in arch.classes:
        blocks = ", ".join(c for c in arch.block_classes if "Embedding" not in c) or "the model's decoder layer class"
        problems.append(
            Problem(
                "model.layer_class",
                f"{model.layer_class} is not a class of {arch.model_type} models",
                f"remove it (found: {blocks}) or fix the name",
            )
        )
    model = dataclasses.replace(model, architecture=model.architecture or architecture, layer_class=model.layer_class or layer_class)
    missing = [name for name in CANONICAL if name != "head_dim" and getattr(model, name) is None]
    problems += [
        Problem(
            f"model.{name}",
            f"unknown for {model.name_or_path!r} (no config.json: not a local model directory, not in the local Hugging Face cache)",
            f"download the model first (huggingface-cli download {model.name_or_path}) or set model.{name} in the recipe",
        )
        for name in missing
    ]
    if problems:
        raise ConfigError(problems)
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


def steps_per_epoch(rows: int, micro_batch_size: int, gradient_accumulation_steps: int, data_parallel: int) -> int:
    """Optimizer steps in one pass over `rows`, counted as the Hugging Face Trainer counts them:
    each rank's share rounded up (DistributedSampler), its batches rounded up, then the
    accumulation windows rounded up (the last window of an epoch may be short there; here the next
    epoch's rows fill it, so the step count matches and the global order stays world-size free)."""
    per_rank = math.ceil(rows / data_parallel)
    batches = math.ceil(per_rank / micro_batch_size)
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


def resolve_schedule(cfg: RunConfig, train_rows: int) -> RunConfig:
    """Steps from epochs, warmup from its ratio, epoch-wise eval and save intervals: decided once, from
    the prepared data's row count, before the ranks start (every rank gets the same numbers)."""
    train, optim, ckpt = cfg.train, cfg.optim, cfg.checkpoint
    assert train.micro_batch_size and train.gradient_accumulation_steps, "resolve() first"
    per_epoch = steps_per_epoch(train_rows, train.micro_batch_size, train.gradient_accumulation_steps, data_parallel_size(cfg))
    max_steps = train.max_steps if train.max_steps is not None else math.ceil((train.epochs or 0) * per_epoch)
    max_steps = max(max_steps, 1)
    train = dataclasses.replace(train, max_steps=max_steps)
    if optim.warmup_ratio > 0:
        optim = dataclasses.replace(optim, warmup_steps=math.ceil(max_steps * optim.warmup_ratio), warmup_ratio=0.0)
    if train.eval_strategy == "epoch":
        train = dataclasses.replace(train, eval_every=per_epoch, eval_strategy="steps")
    if ckpt.save_strategy == "epoch":
        ckpt = dataclasses.replace(ckpt, every=per_epoch, save_strategy="steps")
    return dataclasses.replace(cfg, train=train, optim=optim, checkpoint=ckpt)
