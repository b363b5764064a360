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
from launcher.runtime.data.packing import IGNORE_INDEX, Batch, GlobalOrder, TokenData
from launcher.runtime.model.build import unwrap
from launcher.runtime.parallel import zero
from launcher.runtime.parallel.dist import DistInfo, start_sum
from launcher.runtime.parallel.native import clip_and_step, grad_sync, loss_scale
from launcher.runtime.train.metrics import Reporter

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
    task: Any = None  # tasks.CausalLM | tasks.Classification: the loss and the evaluation
    stopper: EarlyStopper | None = None
    evaluated: dict[str, Any] | None = None  # the metrics of an evaluation at this step, if any
    stop: Any = None  # signals.StopFlag: a log step's loss all-reduce carries its flag too

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.cfg.train.precision]


def token_loss_sum(ctx: Context, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over the batch's labelled tokens (never across documents)."""
    from launcher.kernels import loss as fused
    from launcher.kernels.attention import model_inputs

    # One packing contract for every attention path (kernels/src/attention.py); prompt tuning runs unpacked
    # (its virtual tokens reach the head too, so it keeps the plain loss).
    ids, labels, positions = (torch.from_numpy(a) for a in (batch.input_ids, batch.labels, batch.position_ids))
    flatten = ctx.cfg.method.name != "prompt_tuning"
    device = ctx.info.device
    inputs, targets = model_inputs(
        ids, labels, positions, ctx.attn_implementation, flatten=flatten, device=device, target_device=torch.device("cpu")
    )
    kind = fused.choose(ctx.cfg.kernels.loss, ctx.model, device.type) if flatten else "plain"
    count = int((targets != IGNORE_INDEX).sum())  # the targets are still on the host: no sync
    if kind != "plain":  # the head's forward returns the loss sum: full logits never exist (kernels/src/loss.py)
        rows = fused.labelled_rows(targets)  # the head runs on the tokens with a target only
        rows = rows.to(device, non_blocking=True) if rows is not None else None
        with _autocast(ctx), fused.head_loss(ctx.model, targets.to(device, non_blocking=True), kind, rows) as take:
            output = ctx.model(**inputs)
            return with_router_loss(ctx.model, output, take(output), count), count
    targets = targets.to(device, non_blocking=True)
    with _autocast(ctx):
        output = ctx.model(**inputs)
    logits = output.logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return with_router_loss(ctx.model, output, loss, count), count


def with_router_loss(model: Any, output: Any, loss_sum: torch.Tensor, count: int) -> torch.Tensor:
    """A Mixture-of-Experts model's load-balancing loss added as transformers adds it: a model whose
    config has output_router_logits returns `aux_loss`, and its own loss is mean CE +
    router_aux_loss_coef x aux_loss. Ours is a sum over the labelled tokens, divided by their count
    later, so the term enters times `count` (the step's loss is then the token-weighted mean of each
    micro-batch's CE + coef x aux: transformers' loss on a single batch)."""
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return loss_sum
    inner = unwrap(model)  # the CausalLM keeps its own copy of the coefficient (set from the config at init)
    coef = float(getattr(inner, "router_aux_loss_coef", getattr(getattr(inner, "config", None), "router_aux_loss_coef", 0.0)) or 0.0)
    return loss_sum + (coef * count) * aux.to(loss_sum.device, loss_sum.dtype) if coef else loss_sum


def _autocast(ctx: Context) -> Any:
    # FSDP casts parameters itself (mixed-precision policy); the other backends use autocast.
    if ctx.backend in ("fsdp", "deepspeed") or ctx.compute_dtype == torch.float32:
        return torch.autocast(ctx.info.device.type, enabled=False)
    return torch.autocast(ctx.info.device.type, dtype=ctx.compute_dtype)


def train_step(ctx: Context, step: int, log: bool = True) -> dict[str, float]:
    """One optimizer step. Losses stay on the device; the host waits for them only on a log step."""
    cfg, info = ctx.cfg, ctx.info
    t = cfg.train
    assert t.micro_batch_size and t.gradient_accumulation_steps and t.global_batch_size and t.max_steps
    micro_batches = ctx.order.step_rows(
        step, t.global_batch_size, info.rank, info.world_size, t.micro_batch_size, t.gradient_accumulation_steps
    )
    label_tokens = max(ctx.order.step_label_tokens(ctx.train_data, step, t.global_batch_size), 1)
    lr = lr_at(step, cfg.optim, t.max_steps)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    scale = loss_scale(ctx.backend, info.world_size) / label_tokens
    defer = cfg.parallel.fsdp.defer_grad_sync
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, rows in enumerate(micro_batches):
        batch = ctx.train_data.batch(rows)
        with grad_sync(ctx.model, ctx.backend, i == len(micro_batches) - 1, defer):
            summed, _ = ctx.task.loss_sum(ctx, batch)
            if ctx.engine is not None:
                zero.backward_and_step(ctx.engine, summed * scale)
            else:
                (summed * scale).backward()
        loss_sum += summed.detach().double()
    reduced = None
    extra = ctx.task.step_sums().to(info.device) if hasattr(ctx.task, "step_sums") else None  # a task's own per-step sums
    if log:  # begun before the optimizer step, which hides its latency; the stop flags ride along,
        # so the step boundary needs no collective of its own
        flag = torch.full((1,), ctx.stop.local() if ctx.stop is not None else 0.0, dtype=torch.float64, device=info.device)
        reduced = start_sum(torch.cat([loss_sum.reshape(1), flag, *([extra] if extra is not None else [])]))
    grad_norm = _optimizer_step(ctx)
    tokens, pads = step_tokens(ctx, step, padding=log)
    out = {"lr": lr, "tokens": float(tokens), "pad_tokens": float(pads)}
    if reduced is not None:
        total, signalled, *sums = reduced()
        if ctx.stop is not None:
            ctx.stop.carry(signalled)
        out.update(loss=total / label_tokens, grad_norm=float(grad_norm))
        out.update({name: value / label_tokens for name, value in zip(getattr(ctx.task, "metric_names", ()), sums, strict=True)})
    return out


def step_tokens(ctx: Context, step: int, padding: bool = True) -> tuple[int, int]:
    """(real tokens, padding the model computes) of the whole global batch, from the sample order
    alone (no collective); the padding (kernels/src/attention.py, `padding_computed`: a packed row's
    own padding never reaches the model, the attention layout's does) only when asked, else 0."""
    from launcher.kernels.attention import padding_computed

    t, data = ctx.cfg.train, ctx.train_data
    assert t.micro_batch_size and t.gradient_accumulation_steps and t.global_batch_size
    flatten = ctx.cfg.method.name != "prompt_tuning" and ctx.cfg.task != "classification"  # as the tasks feed the model
    real = pads = 0
    for rank in range(ctx.info.world_size):
        for rows in ctx.order.step_rows(
            step, t.global_batch_size, rank, ctx.info.world_size, t.micro_batch_size, t.gradient_accumulation_steps
        ):
            real += sum(int(data.offsets[r + 1] - data.offsets[r]) for r in rows)
            if padding:
                documents = [data.doc_lengths[data.doc_offsets[r] : data.doc_offsets[r + 1]].tolist() for r in rows]
                pads += padding_computed(documents, ctx.attn_implementation, ctx.info.device.type, flatten)
    return real, pads


def _optimizer_step(ctx: Context) -> Any:
    """Clip and step as the backend does it (parallel/native.py, parallel/zero.py); the gradient norm
    comes back as a tensor, read on log steps only."""
    if ctx.engine is not None:
        return zero.grad_norm(ctx.engine)
    return clip_and_step(ctx.model, ctx.optimizer, ctx.cfg.optim.max_grad_norm)


def train(ctx: Context, start_step: int, on_step_end: Callable[[int], bool]) -> int:
    """Run steps start_step..max_steps-1; `on_step_end(step_done)` checkpoints and says whether to stop."""
    cfg = ctx.cfg
    t = cfg.train
    assert t.max_steps is not None
    ctx.model.train()
    step = start_step
    wants_eval = t.eval_batches > 0 or t.eval_exact_match > 0 or cfg.task == "classification"  # 0: all of it
    if cfg.task == "preference":  # the reward metrics of no pairs would read as zeros
        wants_eval = len(ctx.val_data) > 0
    if step >= t.max_steps and wants_eval:  # a finished run resumed (at any world size): evaluate its weights
        _evaluate(ctx, step)
    while step < t.max_steps:
        begin = time.perf_counter()
        log = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps or step == start_step
        numbers = train_step(ctx, step, log)
        step += 1
        ctx.tokens_seen += numbers["tokens"]
        if log:
            record = {"step": step, **numbers, "tokens_seen": ctx.tokens_seen, "elapsed": ctx.reporter.elapsed()}
            record["tokens_per_s"] = numbers["tokens"] / max(time.perf_counter() - begin, 1e-9)
            ctx.reporter.step(record)
        ctx.evaluated = None
        if wants_eval and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            _evaluate(ctx, step)
            if ctx.stopper is not None and ctx.evaluated is not None:
                ctx.stopper.update(step, ctx.evaluated)
        if on_step_end(step):
            break
    return step


def _evaluate(ctx: Context, step: int) -> None:
    ctx.model.eval()
    metrics, predictions = ctx.task.evaluate(ctx, step)
    ctx.model.train()
    ctx.evaluated = metrics
    ctx.reporter.evaluation(metrics, predictions)


@dataclass
class EarlyStopper:
    """Stop when the watched metric has not improved by `threshold` for `patience` evaluations."""

    metric: str
    mode: str
    patience: int
    threshold: float
    best: float | None = None
    best_step: int | None = None
    waited: int = 0

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        value = float(metrics[self.metric])
        better = self.best is None or (value < self.best - self.threshold if self.mode == "min" else value > self.best + self.threshold)
        if better:
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1

    @property
    def improved_at(self) -> int | None:
        return self.best_step

    @property
    def should_stop(self) -> bool:
        return self.waited >= self.patience

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step, "waited": self.waited}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.waited = state.get("best"), state.get("best_step"), int(state.get("waited", 0))
