"""Packed attention on CUDA without flash-attn: torch's own varlen FlashAttention kernel
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), one call per layer for the whole packed
micro-batch, whatever its documents' lengths.

Registered in transformers' `AttentionInterface` as `launcher_varlen`. It takes flash_attention_2's
inputs (a flattened row [1, T] with `cu_seq_lens_q/k` and `max_length_q/k`, kernels/src/attention.py
`model_inputs`), so the packing contract is the one FlashAttention follows: no layout, no padding,
no per-length loop (launcher_sdpa runs one SDPA call per distinct document length per layer: 28 to
112 calls a layer on mixed lengths). Causal, sliding-window (Mistral) and bidirectional (encoders)
attention map onto the kernel's window; grouped K/V heads go in as they are (enable_gqa), never
copied. Softcapping (Gemma-2) is not supported: the plan takes eager or flash for such a model.

`kernels.attention: auto` on CUDA picks flash-attn where it is installed, this kernel where torch
has it for the GPU (FlashAttention needs sm80+), and launcher_sdpa otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

NAME = "launcher_varlen"


@functools.cache
def available() -> bool:
    """torch ships varlen_attn and this machine's GPU runs its FlashAttention kernel (probed once)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    from launcher.kernels.attention import ampere_or_newer

    return ampere_or_newer() and torch.backends.cuda.is_flash_attention_available()


def kernel() -> Any:
    """The varlen kernel (tests on CPU put a reference in its place: it runs on CUDA only)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """The kernel's (left, right) window: -1 is unbounded. A query sees keys at most
    `sliding_window - 1` positions back (transformers' and launcher_sdpa's band)."""
    if not causal:
        return (-1, -1)
    return (sliding_window - 1, 0) if sliding_window is not None else (-1, 0)


@torch.compiler.disable  # data-dependent lengths: keep it out of compiled graphs, as launcher_sdpa
def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, dim]
    key: torch.Tensor,  # [1, kv heads, T, dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns ([1, T, heads, dim], None)."""
    if softcap is not None:
        raise ValueError("kernels.attention: launcher_varlen cannot apply attention logit softcapping; use eager or flash")
    if dropout:
        raise ValueError("launcher_varlen runs without attention dropout; set the model's attention_dropout to 0 or use eager")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if query.shape[0] != 1 or attention_mask is not None or cu_q is None:
        # not a packed row (a padded batch, generation): transformers' own SDPA, exact with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # The kernel takes one half-precision dtype and is not autocast-aware: under autocast with fp32
    # weights the rotary tables (fp32) promote q and k back to fp32 while v stays bf16.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # [T, heads, dim], one dtype
    out = kernel()(
        q,
        k,
        v,
        cu_q,
        cu_k if cu_k is not None else cu_q,
        int(kwargs["max_length_q"]),
        int(kwargs.get("max_length_k", kwargs["max_length_q"])),
        scale=scaling,
        window_size=window(causal, sliding_window),
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.to(query.dtype)[None], None


def register() -> str:
    """Register the function under NAME (idempotent), with launcher_sdpa's mask (none for a packed
    row, SDPA's own for a padded batch or generation, where the function falls back to SDPA); returns NAME."""
    from launcher.kernels.sdpa_varlen import sdpa_varlen_mask
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
    return NAME
