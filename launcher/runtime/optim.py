"""Optimizer parameter groups: one definition for every backend.

The torch optimizer (FSDP2 / DDP / single, loop.build_optimizer) and DeepSpeed (engine.deepspeed_engine,
whose AdamW takes these groups as `model_parameters`; a group's weight_decay overrides the config's)
decay the same parameters: matrices and embeddings, never 1-D parameters (norm scales, biases).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_ndim(param: torch.Tensor) -> int:
    """The parameter's own rank: ZeRO-3 keeps only an empty partition (its shape is `ds_shape`);
    an FSDP2 DTensor reports its global shape."""
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in (at most) two groups: decayed (>= 2-D) and not decayed (1-D)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if parameter_ndim(p) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if parameter_ndim(p) < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
