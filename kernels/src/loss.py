"""Linear + cross-entropy without the full logits: the LM head and the loss in one pass.

`linear_cross_entropy_sum(hidden [N, H], weight [V, H], targets [N])` is the sum of token losses;
only a [token chunk, vocabulary chunk] block of logits exists at a time. Forward: an online
logsumexp over vocabulary chunks (fp32), keeping one float per token; backward: the logits are
recomputed chunk by chunk and turned into the gradients of the hidden states and of the weight
(fp32 accumulation). At vocab 128k x 8k tokens the plain path holds 4 GB of fp32 logits plus their
gradient; this one holds a few chunks (tests/bench/bench_loss.py). When one block holds every logit
(at most 2048 tokens x 8192 vocabulary: small models, short micro-batches) that block is computed
once, kept for backward and run through the fused log-softmax and softmax kernels instead.

`head_loss(model, targets)` runs it inside the model's own forward: the output-embedding module's
forward is swapped for one that returns the loss sum, so FSDP2's and ZeRO-3's gather hooks on that
module still fire (under both, the head's weight exists only inside its forward). Tokens without a
target (a masked prompt, a document's last token) can be left out of the head altogether (`rows`). Liger Kernel's
fused linear cross-entropy (kernels/src/liger.py) takes the place of the PyTorch one on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100
TOKEN_CHUNK, VOCAB_CHUNK = 2048, 8192  # a 64 MB fp32 block of logits at a time
# Config fields of models that change the logits after the head (softcapping, scaling): the
# swapped head would skip that step, so these models keep the plain loss.
POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        token_chunk: int,
        vocab_chunk: int,
    ) -> torch.Tensor:
        vocab = weight.shape[0]
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        ctx.chunks = (token_chunk, vocab_chunk)
        if hidden.shape[0] <= token_chunk and vocab <= vocab_chunk:
            # One block holds every logit: keep it for backward (no second matmul there) and use the
            # fused log-softmax / softmax kernels (a third of the chunked loop's time on CPU).
            logits = _logits(hidden, weight, bias, 0, vocab)
            picked = torch.log_softmax(logits, dim=1).gather(1, safe[:, None])[:, 0]
            ctx.save_for_backward(hidden, weight, bias, safe, valid, logits)
            ctx.block = True
            return -torch.where(valid, picked, 0.0).sum()
        ctx.block = False
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for t0 in range(0, hidden.shape[0], token_chunk):
            h, tgt = hidden[t0 : t0 + token_chunk], safe[t0 : t0 + token_chunk]
            top = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
            acc = torch.zeros_like(top)
            picked = torch.zeros_like(top)
            for v0 in range(0, vocab, vocab_chunk):
                logits = _logits(h, weight, bias, v0, vocab_chunk)
                new_top = torch.maximum(top, logits.max(dim=1).values)
                acc = acc * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(dim=1)
                top = new_top
                inside = (tgt >= v0) & (tgt < v0 + logits.shape[1])
                local = (tgt - v0).clamp(0, logits.shape[1] - 1)
                picked += torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
            lse[t0 : t0 + token_chunk] = top + torch.log(acc)
            total += torch.where(valid[t0 : t0 + token_chunk], lse[t0 : t0 + token_chunk] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, safe, valid, saved = ctx.saved_tensors  # saved: the logits (one block) or their lse
        token_chunk, vocab_chunk = ctx.chunks
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b and bias is not None else None
        scale = grad_total.float()
        for v0 in range(0, weight.shape[0], vocab_chunk):
            w = weight[v0 : v0 + vocab_chunk]
            grad_w_chunk = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            for t0 in range(0, hidden.shape[0], token_chunk):
                h = hidden[t0 : t0 + token_chunk]
                # d(lse - picked)/d logits = softmax - one_hot(target), zero for ignored tokens
                if ctx.block:
                    grad = torch.softmax(saved, dim=1)
                else:
                    grad = torch.exp(_logits(h, weight, bias, v0, vocab_chunk) - saved[t0 : t0 + token_chunk, None])
                tgt = safe[t0 : t0 + token_chunk]
                inside = (tgt >= v0) & (tgt < v0 + w.shape[0])
                # minus one at each target inside this vocabulary block: a scatter, no host sync
                # (indexing by inside.nonzero() waited for the device once per block)
                local = (tgt - v0).clamp(0, w.shape[0] - 1)
                grad.scatter_add_(1, local[:, None], -inside[:, None].to(grad.dtype))
                grad *= valid[t0 : t0 + token_chunk, None] * scale
                if grad_h is not None:
                    grad_h[t0 : t0 + token_chunk] += grad.to(w.dtype) @ w if w.dtype != torch.float32 else grad @ w
                if grad_w_chunk is not None:
                    grad_w_chunk += grad.t().to(h.dtype) @ h if h.dtype != torch.float32 else grad.t() @ h
                if grad_b is not None:
                    grad_b[v0 : v0 + w.shape[0]] += grad.sum(dim=0).to(grad_b.dtype)
            if grad_w is not None and grad_w_chunk is not None:
                grad_w[v0 : v0 + w.shape[0]] = grad_w_chunk.to(grad_w.dtype)
        grad_h_out = grad_h.to(hidden.dtype) if grad_h is not None else None
        return grad_h_out, grad_w, grad_b, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, vocab_chunk: int) -> torch.Tensor:
    logits = (h @ weight[v0 : v0 + vocab_chunk].t()).float()
    return logits + bias[v0 : v0 + vocab_chunk].float() if bias is not None else logits


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """sum over tokens with a target of cross_entropy(hidden @ weight.T + bias, targets), in fp32."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the matmuls in the autocast dtype, like F.linear
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        out = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, token_chunk, vocab_chunk)
    return out  # type: ignore[no-any-return]


def unwrap(model: nn.Module) -> nn.Module:
    """Through DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) to the model itself."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_head(model: nn.Module) -> nn.Linear | None:
    """The LM head (tied or not, through peft), if the fused loss can stand in for it; else None."""
    base = unwrap(model)
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    config = getattr(base, "config", None)
    if not isinstance(head, nn.Linear) or type(head).__module__.split(".")[0] in ("bitsandbytes", "peft"):
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in POST_PROCESSING):
        return None
    return head


def choose(setting: str, model: nn.Module, device_type: str) -> str:
    """Recipe `kernels.loss` → "liger" | "chunked" | "plain" for this model."""
    from launcher.kernels.attention import log_once

    if setting == "plain":
        choice, why = "plain", ""
    elif output_head(model) is None:
        if setting != "auto":
            raise RuntimeError(f"kernels.loss: {setting} needs a plain linear LM head without logit post-processing; use auto or plain")
        choice, why = "plain", " (the LM head post-processes its logits or is not a linear layer)"
    else:
        from launcher.kernels.liger import has_liger

        liger = device_type == "cuda" and has_liger()
        if setting == "liger" and not liger:
            raise RuntimeError("kernels.loss: liger needs CUDA and liger-kernel (pip install launcher[liger]); or use auto")
        choice, why = ("liger" if liger and setting in ("auto", "liger") else "chunked"), ""
    log_once(f"loss: {choice} linear cross-entropy (kernels.loss: {setting}){why}")
    return choice


def _passed_through(logits: torch.Tensor, loss: torch.Tensor) -> bool:
    """Whether the model returned the head's loss as is: the same tensor, or one that only custom
    autograd Functions touched (ZeRO-3 and DDP wrap module outputs in one), never an operation."""
    if logits is loss:
        return True
    node, target = logits.grad_fn, loss.grad_fn
    if node is None or target is None:  # no graph (evaluation): compare the values
        return logits.shape == loss.shape and bool(torch.equal(logits.detach(), loss.detach()))
    for _ in range(8):
        if node is target:
            return True
        nexts = [fn for fn, _ in node.next_functions if fn is not None]
        if not isinstance(node, torch.autograd.function.BackwardCFunction) or len(nexts) != 1:
            return False
        node = nexts[0]
    return False


def labelled_rows(targets: torch.Tensor) -> torch.Tensor | None:
    """The positions in `targets` (a CPU tensor) that have one, for `head_loss(rows=...)`; None when
    every position has one (nothing to leave out) or none has (the head still runs once)."""
    rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]
    return rows if 0 < rows.numel() < targets.numel() else None


@contextlib.contextmanager
def head_loss(
    model: nn.Module, targets: torch.Tensor, kind: str = "chunked", rows: torch.Tensor | None = None
) -> Iterator[Callable[[Any], torch.Tensor]]:
    """Within the block, the model's forward returns the loss sum over `targets` in place of logits.

    `rows` (from `labelled_rows`, on the targets' device): the head and the loss run on those
    tokens' hidden states only. A prompt-masked chat row has no target on about half its tokens
    (48 % in issue 15's job): their logits add nothing to the loss or its gradient, so the LM head's
    matmuls, the softmax and its backward are computed for the other half alone. The index comes
    from the host, so selecting the rows needs no device sync.
    Yields `take(output) -> loss sum`, which refuses an output whose logits the model changed after
    the head (the loss would then not be the model's).
    """
    head = output_head(model)
    if head is None:
        raise RuntimeError("kernels.loss: this model's LM head cannot be fused with the loss; use kernels.loss: plain")
    seen: list[torch.Tensor] = []
    kept = targets if rows is None else targets.index_select(0, rows)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] != targets.shape[0]:
            raise RuntimeError(f"kernels.loss: the head got {flat.shape[0]} tokens for {targets.shape[0]} targets; use kernels.loss: plain")
        if rows is not None:
            flat = flat.index_select(0, rows)
        if kind == "liger":
            from launcher.kernels.liger import liger_linear_cross_entropy_sum

            loss = liger_linear_cross_entropy_sum(flat, head.weight, kept, head.bias)
        else:
            loss = linear_cross_entropy_sum(flat, head.weight, kept, head.bias)
        seen.append(loss)
        return loss

    def take(output: Any) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        if not seen or not _passed_through(logits, seen[-1]):
            raise RuntimeError(f"kernels.loss: {type(unwrap(model)).__name__} changes the logits after its head; use kernels.loss: plain")
        return logits

    before = head.__dict__.get("forward")  # an instance-level forward someone else installed
    head.forward = forward  # type: ignore[method-assign,assignment]  # an instance attribute: module hooks still run
    try:
        yield take
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before  # type: ignore[method-assign]
