"""The training loop, written out: accumulate, clip, step, log, evaluate, checkpoint, stop on signal.

Numerics live here once for every backend: the loss of a step is the sum of token losses over the
whole global batch divided by its label-token count (known to every rank without a collective),
so micro-batch and rank boundaries do not change it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.config.schema import OptimSection, RunConfig
from launcher.kernels.attention import attention_inputs
from launcher.runtime.dist import DistInfo, all_reduce_sum
from launcher.runtime.metrics import Reporter
from launcher.runtime.packing import IGNORE_INDEX, Batch, GlobalOrder, TokenData
from launcher.runtime.shard import grad_sync, loss_scale

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.scheduler == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape)


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, foreach=True)


@dataclass
class Context:
    """Everything the loop touches, built by the orchestrator."""

    cfg: RunConfig
    info: DistInfo
    model: nn.Module
    optimizer: Any
    train_data: TokenData
    val_data: TokenData
    order: GlobalOrder
    attn_implementation: str
    reporter: Reporter
    backend: str
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: Any = None
    engine: Any = None  # the DeepSpeed engine, when the backend is deepspeed
    tokens_seen: float = 0.0  # real tokens trained on so far, across restarts

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.cfg.train.precision]


def token_loss_sum(ctx: Context, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over the batch's labelled tokens (never across documents)."""
    from launcher.kernels.attention import model_inputs, next_token_targets

    # One packing contract for every attention path (kernels/attention.py); prompt tuning runs unpacked.
    ids, labels, positions = (torch.from_numpy(a) for a in (batch.input_ids, batch.labels, batch.position_ids))
    flatten = ctx.cfg.method.name != "prompt_tuning"
    inputs, targets = model_inputs(ids, labels, positions, ctx.attn_implementation, flatten=flatten, device=ctx.info.device)
    with _autocast(ctx):
        logits = ctx.model(**inputs).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((next_token_targets(labels, positions) != IGNORE_INDEX).sum())  # counted on the host: no sync


def _autocast(ctx: Context) -> Any:
    # FSDP casts parameters itself (mixed-precision policy); the other backends use autocast.
    if ctx.backend in ("fsdp", "deepspeed") or ctx.compute_dtype == torch.float32:
        return torch.autocast(ctx.info.device.type, enabled=False)
    return torch.autocast(ctx.info.device.type, dtype=ctx.compute_dtype)


def train_step(ctx: Context, step: int) -> dict[str, float]:
    cfg, info = ctx.cfg, ctx.info
    t = cfg.train
    assert t.micro_batch_size and t.gradient_accumulation_steps and t.global_batch_size
    micro_batches = ctx.order.step_rows(
        step, t.global_batch_size, info.rank, info.world_size, t.micro_batch_size, t.gradient_accumulation_steps
    )
    label_tokens = max(ctx.order.step_label_tokens(ctx.train_data, step, t.global_batch_size), 1)
    lr = lr_at(step, cfg.optim, t.max_steps)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    scale = loss_scale(ctx.backend, info.world_size) / label_tokens
    loss_sum = tokens = pads = 0.0
    for i, rows in enumerate(micro_batches):
        batch = ctx.train_data.batch(rows)
        last = i == len(micro_batches) - 1
        with grad_sync(ctx.model, ctx.backend, last):
            summed, _ = token_loss_sum(ctx, batch)
            if ctx.engine is not None:
                ctx.engine.backward(summed * scale, scale_wrt_gas=False)
                ctx.engine.step()
            else:
                (summed * scale).backward()
        loss_sum += summed.item()
        tokens += batch.input_ids.size - batch.pad_tokens
        pads += batch.pad_tokens
    grad_norm = _optimizer_step(ctx)
    loss_sum, tokens, pads = all_reduce_sum([loss_sum, tokens, pads], info.device)
    return {"loss": loss_sum / label_tokens, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "pad_tokens": pads}


def _optimizer_step(ctx: Context) -> float:
    if ctx.engine is not None:  # DeepSpeed clipped and stepped at the accumulation boundary
        norm = ctx.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0
    max_norm = ctx.cfg.optim.max_grad_norm or math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in ctx.model.parameters() if p.requires_grad], max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return float(norm)


@torch.no_grad()
def evaluate(ctx: Context, step: int) -> dict[str, float]:
    """Validation loss over a fixed set of rows (the same at any world size), plus exact match."""
    cfg, info = ctx.cfg, ctx.info
    micro = cfg.train.micro_batch_size or 1
    total = min(len(ctx.val_data), cfg.train.eval_batches * (cfg.train.global_batch_size or 1))
    mine = list(range(info.rank, total, info.world_size))
    per_rank = math.ceil(total / info.world_size)
    mine += [-1] * (per_rank - len(mine))  # equal forward counts on every rank (sharded models need it)
    ctx.model.eval()
    loss_sum = count = 0.0
    for start in range(0, per_rank, micro):
        summed, n = token_loss_sum(ctx, ctx.val_data.batch(mine[start : start + micro]))
        loss_sum += summed.item()
        count += n
    matched, asked = exact_match(ctx)
    ctx.model.train()
    loss_sum, count, matched, asked = all_reduce_sum([loss_sum, count, matched, asked], info.device)
    out = {"step": step, "val_loss": loss_sum / max(count, 1)}
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    if asked:
        out["exact_match"] = matched / asked
    return out


def exact_match(ctx: Context) -> tuple[float, float]:
    """Greedy answers to held-out prompts, compared with the reference answers after stripping."""
    n = min(ctx.cfg.train.eval_exact_match, len(ctx.eval_prompts))
    if n == 0 or ctx.tokenizer is None:
        return 0.0, 0.0
    info = ctx.info
    prompts = ctx.eval_prompts[:n][info.rank :: info.world_size]
    slots = math.ceil(n / info.world_size)
    stop = {ctx.tokenizer.eos_token_id, ctx.tokenizer.convert_tokens_to_ids("<|end|>")}
    new_tokens = max(len(ctx.tokenizer.encode(p["answer"], add_special_tokens=False)) for p in ctx.eval_prompts[:n]) + 1
    matched = 0.0
    for slot in range(slots):
        prompt = prompts[slot] if slot < len(prompts) else ctx.eval_prompts[0]
        ids = torch.tensor([prompt["prompt_ids"]], device=info.device)
        start = ids.shape[1]
        for _ in range(new_tokens):  # fixed count: every rank runs the same forwards
            positions = torch.arange(ids.shape[1], device=info.device)[None]
            with _autocast(ctx):
                logits = ctx.model(input_ids=ids, **attention_inputs(positions, ctx.attn_implementation, ctx.compute_dtype)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = ids[0, start:].tolist()
        cut = next((i for i, tok in enumerate(generated) if tok in stop), len(generated))
        if slot < len(prompts):
            matched += ctx.tokenizer.decode(generated[:cut]).strip() == prompt["answer"].strip()
    return matched, float(len(prompts))


def train(ctx: Context, start_step: int, on_step_end: Callable[[int], bool]) -> int:
    """Run steps start_step..max_steps-1; `on_step_end(step_done)` checkpoints and says whether to stop."""
    cfg = ctx.cfg
    ctx.model.train()
    step = start_step
    while step < cfg.train.max_steps:
        begin = time.perf_counter()
        numbers = train_step(ctx, step)
        step += 1
        ctx.tokens_seen += numbers["tokens"]
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or step == start_step + 1:
            record = {"step": step, **numbers, "tokens_seen": ctx.tokens_seen, "elapsed": ctx.reporter.elapsed()}
            record["tokens_per_s"] = numbers["tokens"] / max(time.perf_counter() - begin, 1e-9)
            ctx.reporter.step(record)
        wants_eval = cfg.train.eval_batches > 0 or cfg.train.eval_exact_match > 0
        if wants_eval and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps):
            result = evaluate(ctx, step)
            ctx.reporter.write({**result, "elapsed": ctx.reporter.elapsed()})
            ctx.reporter.print("eval " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        if on_step_end(step):
            break
    return step
