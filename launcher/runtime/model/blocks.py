"""What is done to each repeated block before sharding, in torchtitan's order: activation
checkpointing (full or selective), then torch.compile, then FSDP2's fully_shard (native.py).

Checkpointing goes through transformers' own per-block switch (`GradientCheckpointingLayer`
checkpoints `forward`, so FSDP2's hooks stay outside the checkpoint and are not run again by the
recompute). Selective is op-level, as torchtitan does it: inside each checkpointed block the outputs
of matmuls and of attention are kept, the cheap pointwise ops (norms, activations, rotary, residual
adds) are recomputed in backward. Compiling a block compiles its `_call_impl`, so the checkpoint
is traced inside the compiled region and the policy is applied by the compiler's partitioner.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from launcher.runtime.model.build import find_blocks


@functools.cache
def saved_ops() -> frozenset[Any]:
    """The ops whose outputs selective checkpointing keeps: matmuls and every SDPA backend."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def selective_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep matmul and attention outputs (FlashAttention's own ops too); recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if func in saved_ops() or getattr(func, "namespace", "") == "flash_attn":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict[str, Any]:
    """torch.utils.checkpoint arguments for a mode (full | selective)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    return kwargs


def apply_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block (none | full | selective), through transformers' per-block switch."""
    if mode == "none":
        return
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the older name warns
    if callable(enable):
        enable(activation_checkpointing_kwargs=checkpoint_kwargs(mode))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(mode))  # type: ignore[operator]


def compile_blocks(model: nn.Module, layer_class: str = "") -> int:
    """torch.compile each repeated block in place (module names and state-dict keys unchanged);
    returns how many. The embeddings, head and loss stay eager, as in torchtitan."""
    blocks = find_blocks(model, layer_class)
    for block in blocks:
        block.compile()
    return len(blocks)
