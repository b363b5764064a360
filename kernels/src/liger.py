"""Liger Kernel on CUDA, when installed (`pip install launcher[liger]`): the only module importing it.

- the fused linear cross-entropy behind `kernels.loss: auto | liger` (kernels/src/loss.py);
- RMSNorm / SwiGLU / RoPE patches behind `kernels.liger: true`, applied to a model instance.
Both are CUDA (Triton) kernels; on the CPU the PyTorch paths run.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


@functools.cache
def has_liger() -> bool:
    """liger-kernel importable and a CUDA device present (probed once)."""
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def liger_linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of token losses of hidden @ weight.T (+ bias) against targets, by Liger's fused kernel."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if torch.is_autocast_enabled("cuda"):  # Liger's kernels take one dtype; match what autocast would use
        dtype = torch.get_autocast_dtype("cuda")
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    # The LM head's gradient accumulates over token chunks: in fp32, not in bf16 (Liger's default is
    # the input dtype), where a long sequence's small contributions round away. Liger >= 0.6 takes it.
    accumulate = {"accum_dtype": torch.float32} if "accum_dtype" in _parameters(liger_fused_linear_cross_entropy) else {}
    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum", **accumulate)
    return loss.float()  # type: ignore[no-any-return]


@functools.cache
def _parameters(function: Any) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(function).parameters)


def apply_liger_patches(model: nn.Module) -> bool:
    """RMSNorm, SwiGLU and RoPE patches on this model instance (its loss stays ours), once; False
    when Liger has no patch for the architecture or is unavailable. Instance-level: the modules keep
    their parameters, so sharding hooks are untouched."""
    if not has_liger():
        raise RuntimeError("kernels.liger: needs CUDA and liger-kernel (pip install launcher[liger]); or set kernels.liger: false")
    if getattr(model, "_launcher_liger", None) is not None:
        return bool(model._launcher_liger)
    model._launcher_liger = _patch(model)  # type: ignore[assignment]
    return bool(model._launcher_liger)


def _patch(model: nn.Module) -> bool:
    from launcher.kernels.attention import log_once
    from launcher.kernels.loss import unwrap
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    base = unwrap(model)
    base = getattr(base, "get_base_model", lambda: base)()  # through peft
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log_once(f"liger: no patches for model type {model_type}; the PyTorch modules run")
        return False
    flags = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}
    _apply_liger_kernel_to_instance(model=base, **flags)
    log_once(f"liger: RMSNorm, SwiGLU and RoPE patched on {model_type}")
    return True
