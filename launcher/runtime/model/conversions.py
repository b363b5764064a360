"""transformers' own checkpoint conversions, applied by our per-shard loader and by export.

transformers 5 renames some checkpoint keys on load (GPT-NeoX's `embed_out.` is the model's
`lm_head.`, `LayerNorm.gamma` is `.weight`, ...) and merges others (Mixture-of-Experts: per-expert
`w1/w3/w2` into fused `gate_up_proj` / `down_proj` tensors), from `conversion_mapping.py`, and
reverses both on `save_pretrained`. Our loader reads one tensor at a time, so it asks transformers
for the same list `from_pretrained` uses (`get_model_conversion_mapping`) and applies it with
transformers' own objects: renamings key by key, and each converter once per target tensor (one
layer's experts at a time) with the sources in transformers' order (`dot_natural_key`). Export
applies the reversed renamings, so an export carries the names the original checkpoint had."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Group:
    """The sources of one converted tensor (or tensors): transformers' converter and, per source
    pattern, the checkpoint keys it merges, in transformers' order."""

    converter: Any
    sources: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key)


class Conversions:
    """Checkpoint key → model key (renamings), or the group a converter builds it in."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.renamings: list[Any] = []
        self.converters: list[Any] = []
        self.config = getattr(model, "config", None)
        if model is None:
            return
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # an older transformers converts nothing on load either
            return
        try:
            transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
        except Exception:  # not a PreTrainedModel
            return
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(self, key: str) -> tuple[str, Any]:
        """(the key after transformers' renamings, the converter that builds it or None)."""
        if not self.renamings and not self.converters:
            return key, None
        from transformers.core_model_loading import apply_renamings

        renamed = apply_renamings(key, self.renamings)
        for converter in self.converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                return target, (converter, pattern)
        return renamed, None

    def groups(self, keys: list[str]) -> tuple[dict[str, str], dict[str, Group]]:
        """Every checkpoint key → (renamed key) for plain tensors, and the converted groups by target."""
        from transformers.core_model_loading import dot_natural_key

        plain: dict[str, str] = {}
        groups: dict[str, Group] = {}
        for key in sorted(keys, key=dot_natural_key):
            renamed, found = self.rename(key)
            if found is None:
                plain[key] = renamed
                continue
            converter, pattern = found
            group = groups.setdefault(renamed, Group(copy.deepcopy(converter)))
            group.sources.append((pattern, key))
        return plain, groups

    def convert(self, target: str, group: Group, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model tensors a group builds, its sources read (and released) by transformers' converter."""
        for pattern, key in group.sources:
            group.converter.add_tensor(target, key, pattern, lambda key=key: read(key))
        return dict(group.converter.convert(target, config=self.config))


class SaveConversions:
    """Model tensors → the checkpoint save_pretrained would write: transformers' conversions for this
    architecture reversed (GPT-NeoX's lm_head. → embed_out.; Mixtral's fused experts split back into
    block_sparse_moe.experts.N.w1/w3/w2), streamed: a converter runs as soon as its sources are in."""

    def __init__(self, config: dict[str, Any], hf_config: Any = None) -> None:
        self.config = hf_config
        self.renamings: list[Any] = []
        self.converters: list[Any] = []
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
        except ImportError:
            return
        names = [*(config.get("architectures") or []), config.get("model_type")]
        transforms = next((found for name in names if name and (found := get_checkpoint_conversion_mapping(name))), None) or []
        reverse = [t.reverse_transform() for t in reversed(transforms) if not isinstance(t, PrefixChange)]
        self.renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
        self.converters = [t for t in reverse if isinstance(t, WeightConverter)]
        self.by_pattern = {pattern: c for c in self.converters for pattern in c.source_patterns}

    def name(self, key: str) -> str:
        """A plain tensor's saved name."""
        from transformers.core_model_loading import apply_renamings

        return str(apply_renamings(key, self.renamings)) if self.renamings else key

    def __call__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.converters:
            yield from ((self.name(key), tensor) for key, tensor in tensors)
            return
        from transformers.core_model_loading import apply_converters

        pending: dict[str, Any] = {}
        for key, tensor in tensors:
            renamed, pattern = apply_converters(key, self.converters)
            if pattern is None:
                yield self.name(key), tensor
                continue
            converter = pending.setdefault(renamed, copy.deepcopy(self.by_pattern[pattern]))
            converter.add_tensor(renamed, key, pattern, tensor)
            if len(converter.collected_tensors) == len(converter.source_patterns):
                del pending[renamed]
                for name, value in converter.convert(renamed, config=self.config).items():
                    yield self.name(name), value[0] if isinstance(value, list) else value
        if pending:
            raise ValueError(f"transformers' conversion of {next(iter(pending))} is missing some of its tensors")
