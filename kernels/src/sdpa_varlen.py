"""Packed (varlen) attention on PyTorch SDPA: attend per document, not over the whole row.

Registered in transformers' `AttentionInterface` as `launcher_sdpa`. It takes the same inputs as
`flash_attention_2` (a flattened row [1, T] with `cu_seq_lens_q/k` and `max_length_q/k`, or
packed position ids at batch 1) and runs causal SDPA once per run of equal-length segments of the
row, each run viewed as a [documents, length] batch: the work follows the documents' lengths
(sum of L_i^2), not the row's (T^2), and no [T, T] mask exists.

`lay_out` arranges a micro-batch's documents for it, once per forward (kernels.attention.
model_inputs applies it on the host): sorted by length into buckets, each document padded at its
end to its bucket's longest (within PAD_FACTOR of it), so each bucket is one run and every layer
takes its documents as views of the row: no gather, no scatter back, no per-layer index in
backward. Padding sits after a document's last token, so under causal attention no real token
sees it; an encoder (not causal) gets a key mask. On CUDA nothing is padded (PAD_FACTOR there is
1: equal lengths only), since there a padded slot costs every layer's matmuls while an index costs
little.

The matching `AttentionMaskInterface` entry builds no mask for such a row; any other call (padded
batches with a 2-D mask, batch > 1) gets transformers' own SDPA mask and kernel, so the function is
exact wherever it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NAME = "launcher_sdpa"
# A document joins a bucket when its length is within this factor of the bucket's longest. On CPU a
# small model pays per SDPA call about what it pays for ten padded slots: 1.0-1.25 measured alike,
# 1.6 and 2.0 slower (tests/bench/RESULTS.md, "Peers: the issue-30 harness, padding at the embedding");
# 1.1 pads about 2 % of the slots (1.25: 6 %) for 7 calls a layer instead of 5 on the peers job.
PAD_FACTOR = {"cpu": 1.1}


@dataclass(frozen=True)
class Layout:
    """Where each document sits in the row the model sees: consecutive segments, grouped in runs."""

    runs: tuple[tuple[int, int], ...]  # (segments, length) along the row; sum of products = slots
    real: tuple[int, ...]  # each segment's real tokens (< its length where it is padded)
    source: torch.Tensor | None = None  # [slots] CPU: the token each slot holds (row order), -1 padding; None: slot i is token i
    within: torch.Tensor | None = None  # [slots] CPU: each slot's offset in its segment
    _keys: dict[Any, list[torch.Tensor | None]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def lengths(self) -> list[int]:
        return [length for count, length in self.runs for _ in range(count)]

    def place(self, tokens: torch.Tensor, fill: int) -> torch.Tensor:
        """[T] per-token values (row order) → [slots], `fill` in the padding."""
        if self.source is None:
            return tokens
        return torch.where(self.source >= 0, tokens[self.source.clamp(min=0)], fill)

    def unplace(self, per_slot: torch.Tensor) -> torch.Tensor:
        """[slots, ...] → [T, ...] in row order, without padding: the inverse of `place`."""
        if self.source is None:
            return per_slot
        source = self.source.to(per_slot.device)
        real = (source >= 0).nonzero()[:, 0]
        return per_slot[real[torch.argsort(source[real])]]

    def place_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids for the slots: the tokens' own, and for padding its offset in the segment
        (below the segment's length, so within any model's position table)."""
        if self.source is None:
            return positions
        assert self.within is not None  # made together with source
        return torch.where(self.source >= 0, positions[self.source.clamp(min=0)], self.within)

    def key_lengths(self, device: torch.device) -> list[torch.Tensor | None]:
        """Per run, each segment's real length on `device` (None for a run without padding)."""
        if device not in self._keys:
            out: list[torch.Tensor | None] = []
            at = 0
            for count, length in self.runs:
                real = self.real[at : at + count]
                out.append(None if min(real) == length else torch.tensor(real, device=device))
                at += count
            self._keys[device] = out
        return self._keys[device]


def buckets(lengths: list[int], device_type: str) -> list[list[int]]:
    """The documents (indices into `lengths`), longest first, in buckets: each within PAD_FACTOR of
    its bucket's first (longest) one, whose length they are padded to."""
    factor = PAD_FACTOR.get(device_type, 1.0)
    out: list[list[int]] = []
    for d in sorted(range(len(lengths)), key=lambda d: -lengths[d]):
        if out and lengths[d] * factor >= lengths[out[-1][0]]:
            out[-1].append(d)
        else:
            out.append([d])
    return out


def padded_slots(lengths: list[int], device_type: str) -> int:
    """Slots of padding the layout of documents of these lengths adds (what `lay_out` would pad)."""
    return sum(lengths[b[0]] * len(b) for b in buckets(lengths, device_type)) - sum(lengths)


def lay_out(lengths: list[int], device_type: str) -> Layout:
    """Documents of these lengths (row order) → their layout for this device (see the module doc)."""
    groups = buckets(lengths, device_type)
    runs = tuple((len(b), lengths[b[0]]) for b in groups)
    real = tuple(lengths[d] for b in groups for d in b)
    docs = [d for b in groups for d in b]
    padded = [lengths[b[0]] for b in groups for _ in b]
    if docs == list(range(len(lengths))) and padded == list(real):
        return Layout(runs, real)  # already in row order, nothing padded
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)[docs]  # each segment's first token
    size = torch.tensor(padded)
    within = torch.arange(int(size.sum())) - torch.repeat_interleave(size.cumsum(0) - size, size)
    inside = within < torch.repeat_interleave(torch.tensor(real), size)
    source = torch.where(inside, torch.repeat_interleave(starts, size) + within, -1)
    return Layout(runs, real, source, within)


def runs_of(lengths: list[int]) -> Layout:
    """A layout nobody planned (a compact row): runs of consecutive equal lengths, nothing padded."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0] + 1, n)
        else:
            runs.append((1, n))
    return Layout(tuple(runs), tuple(lengths))


_LAST: list[tuple[torch.Tensor, Layout]] = []  # one slot: every layer of one forward shares the layout


def remember(cu_seqlens: torch.Tensor, layout: Layout) -> None:
    """Attach a layout made on the host to the cu_seqlens tensor the model will pass to every layer."""
    _LAST[:] = [(cu_seqlens, layout)]


def remembered(cu_seqlens: Any) -> Layout | None:
    """The layout `remember` attached to this very cu_seqlens tensor, if any."""
    return _LAST[0][1] if _LAST and _LAST[0][0] is cu_seqlens else None


def _layout_for(cu_seqlens: torch.Tensor) -> Layout:
    layout = remembered(cu_seqlens)
    if layout is not None:
        return layout
    layout = runs_of([int(n) for n in cu_seqlens.diff().tolist()])  # one sync, then reused by every layer
    remember(cu_seqlens, layout)
    return layout


def _cu_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1)
    end = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def _band_mask(longest: int, real: torch.Tensor | None, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [n or 1, 1, L, L] mask, or None when `is_causal` alone is exact."""
    windowed = window is not None and window < longest
    if causal and not windowed:
        return None  # padding follows each document's tokens: causal attention never reaches it
    q = torch.arange(longest, device=device)[:, None]
    k = torch.arange(longest, device=device)[None]
    allowed = (k <= q) if causal else torch.ones(longest, longest, dtype=torch.bool, device=device)
    if windowed:
        allowed = allowed & (k > q - window)  # type: ignore[operator]
    if causal or real is None:
        return allowed[None, None]
    return allowed[None, None] & (k[None] < real[:, None, None])[:, None]  # padded keys hidden (padded queries still see real ones)


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
    heads, groups = query.shape[1], getattr(module, "num_key_value_groups", 1)
    gqa = groups > 1 and query.device.type == "cpu"  # SDPA's own GQA (no repeated K/V copies); CUDA kernels vary in support
    layout = _layout_for(cu)
    outputs = []
    reals = [None] * len(layout.runs) if causal else layout.key_lengths(query.device)  # causal needs no key mask
    # One split per tensor, not a slice per run: in backward a split joins its runs' gradients in one
    # cat, where slices each fill a zero tensor of the whole row and add it to the others.
    sizes = [count * length for count, length in layout.runs]
    runs = zip(*(x[0].split(sizes, dim=1) for x in (query, key, value)), strict=True)  # each [heads, slots of the run, dim]
    for (count, length), real, parts in zip(layout.runs, reals, runs, strict=True):
        qb, kb, vb = (x.unflatten(1, (count, length)).transpose(0, 1) for x in parts)  # views: [count, heads, length, dim]
        if groups > 1 and not gqa:
            kb, vb = repeat_kv(kb, groups), repeat_kv(vb, groups)
        mask = _band_mask(length, real, causal, sliding_window, query.device)
        extra = {"enable_gqa": True} if gqa else {}
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, **extra)
        outputs.append(out.transpose(1, 2).reshape(count * length, heads, -1))  # [slots, heads, dim]
    joined = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return joined[None], None


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
