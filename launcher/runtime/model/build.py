"""The model and tokenizer for a plan: meta device → method (methods.py) → shard (parallel/) → load.

Any Hugging Face architecture: nothing here knows a module name. The model is built with its
parameters on the meta device (buffers such as rotary frequencies are computed for real, on the
CPU), then wrapped (peft), sharded and materialised, and filled from the checkpoint's safetensors
one tensor at a time (each rank keeps its own shard). Checkpoint keys are resolved through a
`WeightMap` taken from the unwrapped model before any wrapping: key → (module, attribute). Wrappers
(peft's LoRA layers keep the original module as `base_layer`, FSDP2 keeps module objects) never
change which module a key fills, so biases, tied embeddings, Conv1D and buffers need no rewrites.
QLoRA quantises through a `load_weights` hook (qlora.py; with methods.py the only modules that
import bitsandbytes / peft).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config.modelfiles import Refused, read_header
from launcher.config.schema import ModelSection
from launcher.runtime.model.conversions import Conversions
from launcher.runtime.model.files import ModelError, model_dir

__all__ = ["DTYPES", "ModelError", "WeightMap", "model_dir"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def skip_unused_imports() -> None:
    """Keep scipy out of a rank: transformers imports `scipy.optimize` as it loads, for the Hungarian
    matching of its object-detection losses, which no launcher task uses (about 5 % of a rank's
    import time, measured on 2 CPUs). Those loss modules are imported here with scipy reported
    absent; everything else sees the real answer. A no-op once they are loaded (or if they move)."""
    import sys

    if "transformers.loss.loss_utils" in sys.modules:
        return
    import transformers.utils as hf_utils

    real = hf_utils.is_scipy_available
    hf_utils.is_scipy_available = lambda: False
    try:
        import transformers.loss.loss_utils  # noqa: F401
    except ImportError:
        pass
    finally:
        hf_utils.is_scipy_available = real


class LazyTokenizer:
    """The tokenizer, loaded at its first use (generation at the first evaluation, 0.8 s) rather
    than before the first step; attributes pass through to it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tokenizer: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._path)
        return getattr(self._tokenizer, name)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def hf_config(path: Path, model: ModelSection, labels: list[str] | None = None) -> Any:
    """The model's own config (for a classifier: with the label map), checked against the plan's numbers."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    config.use_cache = False  # training: no KV cache (and packed batches need it off)
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"), ("vocab_size", "vocab_size")):
        planned, actual = getattr(model, ours), getattr(config, theirs, None)
        if planned is not None and actual is not None and planned != actual:
            raise ModelError(
                f"model.{ours}: the plan says {planned} but {path}/config.json says {actual}; re-plan (launcher plan) or fix the recipe"
            )
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        if config.pad_token_id is None:  # decoder classifiers pool the last non-padding token
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def build_on_meta(
    path: Path, model: ModelSection, attn_implementation: str, dtype: torch.dtype, task: str = "causal_lm", labels: list[str] | None = None
) -> nn.Module:
    """Parameters on the meta device, buffers real (on the CPU): nothing of the weights' size is allocated."""
    from accelerate import init_empty_weights

    config = hf_config(path, model, labels)
    with init_empty_weights(include_buffers=False):
        built = model_class(task).from_config(
            config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=model.trust_remote_code
        )
    built.tie_weights()  # accelerate's meta context re-creates parameters as they are tied: tie them again
    return built


@dataclass
class WeightMap:
    """Checkpoint key → (module, attribute) of the unwrapped model, taken before peft / sharding."""

    targets: dict[str, tuple[nn.Module, str]]
    prefix: str  # the base model's attribute (`model`, `transformer`, `bert`): checkpoints saved from it lack it
    head: set[str] = field(default_factory=set)  # keys of a task head a base checkpoint cannot hold
    init_std: float = 0.02  # the config's initializer_range, for a new head
    conversions: Conversions = field(default_factory=Conversions)  # transformers' renamings and merges

    @classmethod
    def of(cls, model: nn.Module, task: str) -> WeightMap:
        owners = dict(model.named_modules(remove_duplicate=False))
        targets: dict[str, tuple[nn.Module, str]] = {}
        for key in model.state_dict(keep_vars=True):
            owner, _, attr = key.rpartition(".")
            targets[key] = (owners[owner], attr)
        prefix = str(getattr(model, "base_model_prefix", ""))
        head: set[str] = set()
        if task == "classification":
            head = {k for k in targets if not k.startswith(f"{prefix}.") or ".pooler." in k}
        std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
        init_std = float(std) if isinstance(std, int | float) and math.isfinite(std) else 0.02
        return cls(targets, prefix, head, init_std, Conversions(model))

    def resolve(self, key: str) -> str | None:
        """The model's key for a checkpoint key (the same model, or its base model saved alone)."""
        for candidate in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            if candidate in self.targets:
                return candidate
        return None

    def tensor(self, key: str) -> torch.Tensor:
        owner, attr = self.targets[key]
        return getattr(owner, attr)


def find_blocks(model: nn.Module, layer_class: str = "") -> list[nn.Module]:
    """The repeated blocks (decoder / encoder layers): instances of `layer_class` when given, else
    the longest ModuleList whose members share one class. Works on wrapped and sharded models."""
    if layer_class:
        found = [m for m in model.modules() if type(m).__name__ in (layer_class, f"FSDP{layer_class}")]
        if found:
            return found
    lists: list[nn.ModuleList] = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not lists:
        raise ModelError(f"model.layer_class: no {layer_class or 'repeated block list'} in this model; set it to the block class")
    return list(max(lists, key=lambda blocks: len(list(blocks))))


def head_modules(model: nn.Module, pooler: bool = True) -> list[nn.Module]:
    """What a task head is, by structure: the top-level model's children other than the backbone
    that hold weights (lm_head, score, classifier; not a dropout), and the backbone's pooler if it has one (not under LoRA, which
    adapts the pooler's linear layer like any other)."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None)
    heads = [child for name, child in base.named_children() if name != prefix and next(child.parameters(), None) is not None]
    if pooler and backbone is not None and getattr(backbone, "pooler", None) is not None:
        heads.append(backbone.pooler)
    return heads


def final_norms(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Norm layers beside the block list in its parent (Llama's model.norm, GPT-2's ln_f)."""
    for parent in model.modules():
        children = list(parent.children())
        if any(isinstance(c, nn.ModuleList) and len(c) and c[0] is blocks[0] for c in children):
            return [c for c in children if "Norm" in type(c).__name__ or isinstance(c, nn.LayerNorm)]
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / peft wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def materialize(model: nn.Module, device: torch.device, buffer_device: torch.device | None = None) -> None:
    """Allocate meta parameters (sharded or not) on `device`; move the real buffers to `buffer_device`
    (default `device`): with FSDP2's CPU offload the parameters live on the host, the buffers (rotary
    tables) where the compute is."""
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t.to(device))
    if buffer_device is not None and buffer_device != device:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(buffer_device)
    base = unwrap(model)
    if not any(type(m).__name__.startswith("FSDP") for m in base.modules()):
        # `_apply` gives each module its own new parameter; FSDP2 keeps shared parameters shared itself.
        tie = getattr(base, "tie_weights", None)
        if callable(tie):
            tie()


def load_weights(
    module: nn.Module,
    weights: WeightMap,
    path: Path,
    seed: int = 0,
    convert: Callable[[nn.Module, str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fill the model from the directory's safetensors, one tensor at a time (each rank keeps its
    shard); a task head the checkpoint cannot hold is initialised as transformers would.
    `convert(owner module, attribute, full tensor)` turns a checkpoint tensor into what the target
    holds (QLoRA: the packed 4-bit data, qlora.py) before the rank's shard is cut from it."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights found")
    for file in files:  # the plan's header checks again (a FIFO would block safe_open forever): one line, not a traceback
        try:
            read_header(file)
        except Refused as exc:
            raise ModelError(f"{exc}; {exc.fix}") from None
    filled: set[int] = set()

    def fill(name: str, full: torch.Tensor) -> None:
        target = weights.tensor(name)
        copy_full_into(target, convert(*weights.targets[name], full) if convert else full)
        filled.add(id(target))

    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    plain, groups = weights.conversions.groups([k for k in where if weights.resolve(k) is None])
    for file in files:  # one tensor at a time: each rank keeps its shard of it
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118
                name = weights.resolve(key) or weights.resolve(plain.get(key, key))
                if name is not None:
                    fill(name, handle.get_tensor(key))

    def read(key: str) -> torch.Tensor:
        with safe_open(str(where[key]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    for target, group in groups.items():  # tensors transformers merges on load (one layer's experts at a time)
        for key, full in weights.conversions.convert(target, group, read).items():
            name = weights.resolve(key)
            if name is None:
                raise ModelError(f"{path}: transformers' conversion of {group.sources[0][1]} gives {key}, which the model does not have")
            fill(name, full)
    missing = [k for k in weights.targets if id(weights.tensor(k)) not in filled and not _buffer_computed(weights, k)]
    new_head = [k for k in missing if k in weights.head]
    if len(new_head) != len(missing):
        name = next(k for k in missing if k not in weights.head)
        raise ModelError(
            f"{path}: the checkpoint has no weight for {name} (a weight of the model, module {name.rpartition('.')[0]}); "
            f"{len(missing) - len(new_head)} of the model's weights are missing: is model.name_or_path the model this checkpoint was saved from?"
        )
    init_new_head(weights, new_head, seed)


def _buffer_computed(weights: WeightMap, key: str) -> bool:
    owner, attr = weights.targets[key]
    return attr in owner._buffers  # buffers were built for real; a checkpoint need not hold them


def init_new_head(weights: WeightMap, keys: list[str], seed: int) -> None:
    """A classifier head on a pretrained backbone: normal(0, initializer_range) weights, zero biases,
    drawn from (seed, name) so every rank and world size starts alike."""
    for key in keys:
        target = weights.tensor(key)
        attr = weights.targets[key][1]
        full = torch.zeros(tuple(target.shape), dtype=torch.float32)
        if attr == "weight" and full.ndim >= 2:
            generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            full.normal_(0.0, weights.init_std, generator=generator)
        elif attr == "weight":
            full.fill_(1.0)  # a norm's scale
        copy_full_into(target, full)


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard if it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            shard = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(full.to(target.dtype))


def reinit_buffers(module: nn.Module, device: torch.device) -> None:
    """Rotary frequencies of a model transformers built for ZeRO-3 (zero.py): rebuild them on `device`."""
    for sub in module.modules():
        if hasattr(sub, "inv_freq") and hasattr(sub, "config"):
            fresh = type(sub)(sub.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(sub, name, buffer.to(device))
