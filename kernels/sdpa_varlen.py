"""Packed (varlen) attention on PyTorch SDPA: attend per document, not over the whole row.

Registered in transformers' `AttentionInterface` as `launcher_sdpa`. It takes the same inputs as
`flash_attention_2` (a flattened row [1, T] with `cu_seq_lens_q/k` and `max_length_q/k`, or
packed position ids at batch 1) and regroups the documents into padded [documents, longest]
batches for causal SDPA, so the work follows the documents' lengths (sum of L_i^2), not the row's
(T^2), and no [T, T] mask exists. Documents are bucketed by length (within a factor 2 of the
bucket's longest), so one long document cannot make every short one pay its length.

The matching `AttentionMaskInterface` entry builds no mask for such a row; any other call (padded
batches with a 2-D mask, batch > 1) gets transformers' own SDPA mask and kernel, so the function is
exact wherever it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NAME = "launcher_sdpa"


@dataclass(frozen=True)
class Bucket:
    gather: torch.Tensor  # [n * L] token index of each padded slot (clamped into the row)
    docs: int  # n
    longest: int  # L
    lengths: torch.Tensor  # [n] each document's length (for the key mask when not causal)
    valid: torch.Tensor | None  # [t] slots holding a real token, None when every slot does


@dataclass(frozen=True)
class Groups:
    buckets: tuple[Bucket, ...]
    inverse: torch.Tensor | None  # bucket order -> token order; None when already in token order


_LAST: list[tuple[torch.Tensor, Groups]] = []  # one slot: every layer of one forward shares the plan


def plan_groups(lengths: list[int], device: torch.device) -> Groups:
    """Bucket documents (given in row order) by length; index tensors built on the CPU, moved once."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    order = sorted(range(len(lengths)), key=lambda d: -lengths[d])
    groups: list[list[int]] = []
    for d in order:
        if groups and 2 * lengths[d] > lengths[groups[-1][0]]:
            groups[-1].append(d)
        else:
            groups.append([d])
    total = sum(lengths)
    buckets, token_order = [], []
    for docs in groups:
        longest = lengths[docs[0]]
        lens = torch.tensor([lengths[d] for d in docs])
        offsets = torch.arange(longest)
        slots = torch.tensor([starts[d] for d in docs])[:, None] + offsets[None]
        valid = (offsets[None] < lens[:, None]).reshape(-1)
        token_order.append(slots.reshape(-1)[valid])
        buckets.append(
            Bucket(
                gather=slots.reshape(-1).clamp(max=total - 1).to(device, non_blocking=True),
                docs=len(docs),
                longest=longest,
                lengths=lens.to(device, non_blocking=True),
                valid=None if bool(valid.all()) else valid.nonzero().reshape(-1).to(device, non_blocking=True),
            )
        )
    flat_order = torch.cat(token_order)
    in_order = bool(torch.equal(flat_order, torch.arange(total)))
    inverse = None if in_order else torch.argsort(flat_order).to(device, non_blocking=True)
    return Groups(tuple(buckets), inverse)


def remember(cu_seqlens: torch.Tensor, groups: Groups) -> None:
    """Attach a plan made on the host to the cu_seqlens tensor the model will pass to every layer."""
    _LAST[:] = [(cu_seqlens, groups)]


def _groups_for(cu_seqlens: torch.Tensor) -> Groups:
    if _LAST and _LAST[0][0] is cu_seqlens:
        return _LAST[0][1]
    lengths = cu_seqlens.diff().tolist()  # a plan nobody made on the host: one sync, then reused
    groups = plan_groups([int(n) for n in lengths], cu_seqlens.device)
    remember(cu_seqlens, groups)
    return groups


def _cu_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1)
    end = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def _band_mask(longest: int, lengths: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor | None:
    """Boolean [n or 1, 1, L, L] mask, or None when `is_causal` alone is exact."""
    q = torch.arange(longest, device=lengths.device)[:, None]
    k = torch.arange(longest, device=lengths.device)[None]
    if causal and (window is None or window >= longest):
        return None
    allowed = (k <= q) if causal else torch.ones(longest, longest, dtype=torch.bool, device=lengths.device)
    if window is not None and window < longest:
        allowed = allowed & (k > q - window)
    if causal:
        return allowed[None, None]
    return allowed[None, None] & (k[None] < lengths[:, None, None])[:, None]  # padded keys hidden


@torch.compiler.disable  # data-dependent shapes: keep it out of compiled graphs
def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, seq, dim]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns ([batch, seq, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if softcap is not None:
        raise ValueError("kernels.attention: sdpa cannot apply attention logit softcapping (this model uses it); use eager or flash")
    cu = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    single = query.shape[0] == 1 and query.shape[2] == key.shape[2] and attention_mask is None
    if not single:  # a padded batch (its mask built by sdpa_mask) or a cached decode step
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if cu is None:  # like flash_attention_2: packed position ids at batch 1, else one document
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.numel() == query.shape[2]:
            cu = _cu_from_positions(position_ids)
        else:
            cu = torch.tensor([0, query.shape[2]], dtype=torch.int32, device=query.device)

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    heads = query.shape[1]
    groups = getattr(module, "num_key_value_groups", 1)
    q, k, v = query[0], key[0], value[0]  # [heads, T, dim]
    outputs = []
    for bucket in _groups_for(cu).buckets:
        mask = _band_mask(bucket.longest, bucket.lengths, causal, sliding_window)

        def regroup(x: torch.Tensor, bucket: Bucket = bucket) -> torch.Tensor:
            return x[:, bucket.gather].reshape(x.shape[0], bucket.docs, bucket.longest, -1).transpose(0, 1)

        qb, kb, vb = regroup(q), regroup(k), regroup(v)
        if groups > 1:
            kb, vb = repeat_kv(kb, groups), repeat_kv(vb, groups)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None)
        out = out.transpose(1, 2).reshape(bucket.docs * bucket.longest, heads, -1)  # [slots, heads, dim]
        outputs.append(out if bucket.valid is None else out[bucket.valid])
    joined = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    inverse = _groups_for(cu).inverse
    if inverse is not None:
        joined = joined[inverse]
    return joined.reshape(1, -1, heads, joined.shape[-1]), None


def sdpa_varlen_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask for one packed row (the attention function keeps documents apart); otherwise SDPA's own."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the function and its mask under NAME (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
    return NAME
