"""transformers' own checkpoint conversions, applied by our per-shard loader and by export.

transformers 5 renames some checkpoint keys on load (GPT-NeoX's `embed_out.` is the model's
`lm_head.`, `LayerNorm.gamma` is `.weight`, ...) and merges others (Mixture-of-Experts: per-expert
`w1/w3/w2` into fused `gate_up_proj` / `down_proj` tensors), from `conversion_mapping.py`, and
reverses both on `save_pretrained`. Our loader reads one safetensors tensor at a time, so it asks
transformers for the same mapping (`get_model_conversion_mapping`, the list `from_pretrained` uses)
and applies its renamings key by key; export applies the reversed renamings, so an export carries
the names the original checkpoint had. A key that needs a converter (tensors merged or split) is one
clear error until the loader groups them (issue 25)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Renamer = Callable[[str], tuple[str, bool]]  # checkpoint key -> (model key, needs a converter)


def _identity(key: str) -> tuple[str, bool]:
    return key, False


def load_renamer(model: nn.Module) -> Renamer:
    """Checkpoint key → the model's key, with transformers' renamings for this model (and whether a
    converter, not a rename, would be needed). The identity when transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers converts nothing on load either
        return _identity
    try:
        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # not a PreTrainedModel
        return _identity
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return _identity

    def rename(key: str) -> tuple[str, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters)
        return renamed, pattern is not None

    return rename


def save_renamer(config: dict[str, Any]) -> Callable[[str], str]:
    """The model's key → the name save_pretrained would write (GPT-NeoX's lm_head. → embed_out.), from
    config.json's architecture (else model_type). Renamings only: a converter's tensors keep the
    model's (fused) layout, which transformers loads as it is."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, rename_source_key
    except ImportError:
        return lambda key: key
    names = [*(config.get("architectures") or []), config.get("model_type")]
    transforms = next((found for name in names if name and (found := get_checkpoint_conversion_mapping(name))), None) or []
    reverse: list[Any] = [
        t.reverse_transform() for t in reversed(transforms) if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)
    ]
    if not reverse:
        return lambda key: key
    return lambda key: rename_source_key(key, reverse, [], reverse=True)[0]
