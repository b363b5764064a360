"""Attention path selection and document isolation for packed rows.

The only module that probes flash-attn. Packed rows mark document starts with position id 0:
- flash_attention_2 (CUDA, flash-attn installed): position ids alone; Hugging Face turns them into
  cu_seqlens for the varlen kernel, so each document attends only to itself;
- sdpa / eager (the PyTorch fallback, and CPU): an explicit block-diagonal causal mask.
"""

from __future__ import annotations

import torch


def _probe_flash() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except ImportError:
        return False


HAS_FLASH_ATTN = _probe_flash()


def attn_implementation(setting: str, device_type: str) -> str:
    """Recipe `kernels.attention` → the Hugging Face attn_implementation name."""
    if setting == "flash" or (setting == "auto" and device_type == "cuda" and HAS_FLASH_ATTN):
        if not HAS_FLASH_ATTN:
            raise RuntimeError("kernels.attention: flash needs the flash-attn package (pip install launcher[flash]); or use auto")
        return "flash_attention_2"
    return "eager" if setting == "eager" else "sdpa"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] position ids → the index of the document each token belongs to."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def document_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, seq, seq] mask: token i sees token j iff same document and j <= i."""
    docs = document_ids(position_ids)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def attention_inputs(position_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Keyword arguments for the model's forward that keep packed documents apart."""
    if implementation == "flash_attention_2":
        return {"position_ids": position_ids, "attention_mask": None}
    return {"position_ids": position_ids, "attention_mask": document_causal_mask(position_ids, dtype)}
