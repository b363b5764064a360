"""The attention choice and the one packing contract every attention path follows.

A packed micro-batch is [B, S] input ids / labels / position ids; position ids restart at 0 at each
document, and padding is a document of its own. `model_inputs` turns it into what the model's
forward takes, for every implementation:

- flash_attention_2/3 (CUDA), `launcher_varlen` (torch's own varlen FlashAttention kernel on CUDA,
  kernels/src/varlen.py) and `launcher_sdpa` (our SDPA, kernels/src/sdpa_varlen.py): the micro-batch
  flattened to one row [1, T] without the documents that carry no target (padding), with position
  ids and the explicit varlen kwargs transformers' attention functions take (`cu_seq_lens_q/k`,
  `max_length_q/k`). FlashAttention consumes them directly at any micro-batch size (position ids
  alone mean packing to transformers only at batch 1); `launcher_sdpa` attends per document
  (causal, sliding-window or bidirectional, as the module asks), and its row is laid out for it:
  documents sorted into buckets by length and, on CPU, padded at their ends to the bucket's
  longest, so every layer takes each bucket as a view (`in_token_order` maps outputs back);
- plain `sdpa` (a model built outside the launcher): the same flattened row; transformers builds a
  block-diagonal mask from the position ids (exact, dense);
- eager (causal LMs): the rows as they are; transformers builds each row's block-diagonal causal
  mask (with the model's sliding window, if any) from the position ids: the reference path, dense;
- `flatten=False` (prompt tuning: peft prepends virtual tokens, rows hold one document each): rows
  as they are, nothing but the input ids; plain causal attention is exact there.

Targets come back flattened in the same token order as the model's output, with IGNORE_INDEX at
each document's last token, so the loss never predicts across documents.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

IGNORE_INDEX = -100
VARLEN = ("flash_attention_2", "flash_attention_3", "launcher_sdpa", "launcher_varlen")


@functools.cache
def has_flash_attn() -> bool:
    """flash-attn usable by transformers (probed once, only when a CUDA run asks)."""
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except ImportError:
        return False


@functools.cache
def log_once(line: str) -> None:
    """One line on rank 0 per distinct choice."""
    if os.environ.get("RANK", "0") == "0":
        print(f"launcher: {line}", flush=True)


def attn_implementation(setting: str, device_type: str, softcap: bool = False, half: bool = True) -> str:
    """Recipe `kernels.attention` → the attn_implementation name the model is built with. `softcap`:
    the model caps its attention scores (Gemma-2), which SDPA cannot: auto takes eager then, unless
    flash-attn (which applies it) runs (validation refuses sdpa for such a model). `half`: the run
    computes in bf16 / fp16 (train.precision); auto takes a FlashAttention kernel only then, and only
    on sm80+ GPUs (flash-attn installed on a V100 or T4 node fails at the first forward)."""
    flash_fits = device_type == "cuda" and half and ampere_or_newer()
    flash = setting == "flash" or (setting == "auto" and flash_fits and has_flash_attn())
    if flash and not has_flash_attn():
        raise RuntimeError("kernels.attention: flash needs the flash-attn package (pip install launcher[flash]); or use auto")
    if flash:
        name = "flash_attention_2"
    elif setting == "eager" or softcap:
        name = "eager"
    elif setting == "auto" and flash_fits and _torch_varlen():
        from launcher.kernels.varlen import register as register_varlen  # one kernel call per layer (kernels/src/varlen.py)

        name = register_varlen()
    else:
        from launcher.kernels.sdpa_varlen import register

        name = register()
    log_once(f"attention: {name} (kernels.attention: {setting})")
    return name


@functools.cache
def ampere_or_newer() -> bool:
    """A CUDA GPU FlashAttention kernels run on (sm80+: A100, H100, L4; not V100 or T4), probed once."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _torch_varlen() -> bool:
    from launcher.kernels.varlen import available

    return available()


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


def next_token_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] labels → [B, S] targets: token t predicts label t+1 of its own document, else IGNORE."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets[:, :-1][position_ids[:, 1:] == 0] = IGNORE_INDEX  # a document's last token: the next one is another's
    return targets


def varlen_kwargs(lengths: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """cu_seq_lens / max_length for documents of these lengths (a CPU tensor), in one flattened row."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max())
    cu = cu.to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    implementation: str,
    *,
    flatten: bool = True,
    device: torch.device | None = None,
    target_device: torch.device | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """A packed [B, S] micro-batch (CPU tensors) → (kwargs for the model's forward, targets [N]).

    N is the number of tokens the model returns (B * S for rows, T when flattened);
    `device` is where the tensors go (default: where they are), `target_device` where the targets
    go (default: `device`; the CPU when the caller reads them before moving them).
    """
    device = device or input_ids.device
    target_device = target_device or device
    targets = next_token_targets(labels, position_ids)
    if not flatten:
        return {"input_ids": input_ids.to(device)}, targets.reshape(-1).to(target_device)
    if implementation == "eager":  # transformers builds the per-row block-diagonal (and sliding-window) mask
        rows = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device), "attention_mask": None, "use_cache": False}
        return rows, targets.reshape(-1).to(target_device)

    starts = position_ids == 0
    starts[:, 0] = True  # a row always starts a document
    doc = torch.cumsum(starts.reshape(-1), 0) - 1
    docs = int(doc[-1]) + 1
    has_target = torch.zeros(docs, dtype=torch.int64).index_add_(0, doc, (targets.reshape(-1) != IGNORE_INDEX).long()) > 0
    if not bool(has_target.any()):
        has_target[0] = True  # nothing to learn from (an empty eval row): keep one document for the forward
    keep = has_target[doc]
    lengths = torch.bincount(doc[keep], minlength=docs)[has_target]
    ids, positions, kept = input_ids.reshape(-1)[keep], position_ids.reshape(-1)[keep], targets.reshape(-1)[keep]
    layout = None
    if implementation == "launcher_sdpa":  # documents sorted into padded buckets (kernels/src/sdpa_varlen.py)
        from launcher.kernels.sdpa_varlen import lay_out

        layout = lay_out(lengths.tolist(), device.type)
        ids, positions, kept = layout.place(ids, 0), layout.place_positions(positions), layout.place(kept, IGNORE_INDEX)
        lengths = torch.tensor(layout.lengths)
    kwargs: dict[str, Any] = {
        "input_ids": ids[None].to(device, non_blocking=True),
        "position_ids": positions[None].to(device, non_blocking=True),
        "attention_mask": None,
        "use_cache": False,
    }
    if implementation in VARLEN or implementation == "sdpa":
        kwargs.update(varlen_kwargs(lengths, device))
    if layout is not None:
        from launcher.kernels.sdpa_varlen import remember

        remember(kwargs["cu_seq_lens_q"], layout)
    return kwargs, kept.to(target_device, non_blocking=True)


def padding_computed(documents: list[list[int]], implementation: str, device_type: str, flatten: bool = True) -> int:
    """Padding positions the model computes for a micro-batch whose rows hold documents of these
    lengths (each row's, in order; every document with a target, as a prepared cache holds them).
    Rows that go as they are (eager, `flatten=False`) carry their padding to the longest row; a
    flattened row drops it, and only launcher_sdpa's layout pads (its buckets); other paths pad nothing."""
    if not flatten or implementation == "eager":
        real = [sum(row) for row in documents]
        return len(real) * max(real, default=0) - sum(real)
    if implementation == "launcher_sdpa":
        from launcher.kernels.sdpa_varlen import padded_slots

        return padded_slots([n for row in documents for n in row], device_type)
    return 0


def in_token_order(kwargs: dict[str, Any], per_slot: torch.Tensor) -> torch.Tensor:
    """[slots, ...] model outputs of a `model_inputs` row → [T, ...] in the row's token order,
    without padding (the launcher_sdpa layout sorts and pads documents; the others are as is)."""
    from launcher.kernels.sdpa_varlen import remembered

    layout = remembered(kwargs.get("cu_seq_lens_q"))
    return per_slot if layout is None else layout.unplace(per_slot)


def generation_inputs(
    sequences: list[list[int]], implementation: str, *, flatten: bool = True, keep_logits: bool = True, device: torch.device | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Token sequences (prompts with what was generated so far) → (kwargs for one forward over all of
    them, the index of each sequence's last token in that forward's logits, flattened to [-1, vocab]).

    The same contract as training's: a flattened row of documents with its varlen kwargs (and
    launcher_sdpa's layout), or rows padded at their ends where rows go as they are (eager,
    `flatten=False`; causal attention never reaches padding that follows a sequence). `keep_logits`:
    pass `logits_to_keep` so the head runs on the last tokens only (the model's forward takes it);
    otherwise every position's logits come back and the index picks from them."""
    device = device or torch.device("cpu")
    lengths = torch.tensor([len(s) for s in sequences])
    ends = torch.cumsum(lengths, 0) - 1  # each sequence's last token in row order
    if not flatten or implementation == "eager":
        width = int(lengths.max())
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, tokens in enumerate(sequences):
            ids[i, : len(tokens)] = torch.tensor(tokens)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
        if flatten:  # eager: positions per row, no mask (plain causal)
            kwargs.update(position_ids=torch.arange(width).expand(len(sequences), -1).to(device), attention_mask=None, use_cache=False)
        last = lengths - 1
        if keep_logits:
            kwargs["logits_to_keep"] = last[:, None].to(device)  # [rows, 1]: one position per row
            return kwargs, torch.arange(len(sequences))
        return kwargs, torch.arange(
            len(sequences)
        ) * width + last  # prompt tuning's virtual tokens come first: the caller keeps the last `width`
    ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    slots = ends
    layout = None
    if implementation == "launcher_sdpa":
        from launcher.kernels.sdpa_varlen import lay_out

        layout = lay_out(lengths.tolist(), device.type)
        ids, positions = layout.place(ids, 0), layout.place_positions(positions)
        if layout.source is not None:  # where each token sits among the slots
            where = torch.empty(len(ids), dtype=torch.long)
            real = (layout.source >= 0).nonzero()[:, 0]
            where[layout.source[real]] = real
            slots = where[ends]
        lengths = torch.tensor(layout.lengths)
    kwargs = {"input_ids": ids[None].to(device), "position_ids": positions[None].to(device), "attention_mask": None, "use_cache": False}
    if implementation in VARLEN or implementation == "sdpa":
        kwargs.update(varlen_kwargs(lengths, device))
    if layout is not None:
        from launcher.kernels.sdpa_varlen import remember

        remember(kwargs["cu_seq_lens_q"], layout)
    if keep_logits:
        kwargs["logits_to_keep"] = slots.to(device)
        return kwargs, torch.arange(len(sequences))
    return kwargs, slots
