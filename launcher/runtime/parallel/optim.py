"""The optimizer: parameter groups, one definition for every backend, and torch's AdamW for FSDP2 / DDP /
one process (DeepSpeed builds its own from the same groups).

The torch optimizer (FSDP2 / DDP / single, `build_optimizer` below) and DeepSpeed (zero.deepspeed_engine,
whose AdamW takes these groups as `model_parameters`; a group's weight_decay overrides the config's)
decay the same parameters: matrices and embeddings, never 1-D parameters (norm scales, biases).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launcher.config.schema import OptimSection


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


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norms, biases): the groups every backend uses.
    Plain tensors (DDP, one process) get the fused kernel (one pass per tensor: half the foreach
    step's time on CPU, the same update within float32 rounding); FSDP2's DTensors keep foreach."""
    from torch.distributed.tensor import DTensor

    groups = parameter_groups(model, optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params) and {p.device.type for p in params} <= {"cpu", "cuda"}
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **kind)
