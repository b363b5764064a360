"""Preference tuning: DPO, IPO, SimPO and ORPO on the pairs data/pairs.py prepared, TRL's formulas.

A pair is two sequences in one packed row (chosen, then rejected), so the two are always in the same
micro-batch; each sequence's log-probability is the sum of its response tokens' log-probabilities
(TRL's), or their mean for SimPO and ORPO (TRL's CPO/ORPO `average_log_prob`). The loss of a step
is the mean over its pairs (the loop's denominator: a row's label count is its number of pairs).

The reference model is never a second copy: with adapters (LoRA, QLoRA) it is the same model with
the adapters switched off (peft's `disable_adapter`); otherwise (full, freeze) its log-probabilities
are computed once before training, by the same sharded model in the first epoch's own micro-batches
(so step 1 is bit for bit policy = reference), and stored beside the prepared data
(`reference-<key>.npz`, reused by a resumed run). SimPO and ORPO need none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.config.schema import LORA_METHODS, PreferenceSection, RunConfig
from launcher.runtime.data.packing import IGNORE_INDEX, Batch, GlobalOrder, TokenData
from launcher.runtime.parallel.dist import all_reduce_sum, row_shares
from launcher.runtime.train.loop import Context, _autocast

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def pair_losses(
    pref: PreferenceSection, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses [P] and the six METRICS per pair [P, 6], from per-sequence log-probabilities
    [2P] (chosen, rejected, chosen, ...) summed over `tokens` [2P] response tokens."""
    chosen, rejected = logps[0::2], logps[1::2]
    n_chosen, n_rejected = tokens[0::2].clamp(min=1), tokens[1::2].clamp(min=1)
    beta, smoothing = pref.beta, pref.label_smoothing
    if pref.loss in ("dpo", "ipo"):
        assert reference is not None, "dpo and ipo need the reference log-probabilities"
        chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
        if pref.loss == "dpo":
            margin = chosen_ratio - rejected_ratio
            losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        else:  # IPO on per-token log-ratios (TRL's normalisation, confirmed with the IPO authors)
            losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
        good, bad, shown = beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), (chosen, rejected)
    elif pref.loss == "simpo":  # SimPO (Meng et al. 2024): reward beta x mean token log-prob, margin gamma
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        margin = chosen - rejected - pref.gamma / beta
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        good, bad, shown = beta * chosen.detach(), beta * rejected.detach(), (chosen, rejected)
    else:
        # orpo: the chosen response's NLL minus lambda x log sigmoid(log odds ratio), each sequence's
        # probability its tokens' geometric mean. The NLL is per pair, the chosen response's tokens'
        # mean, as the ORPO paper writes its SFT term (Hong et al. 2024: the loss over a response's m
        # tokens divided by m, in expectation over pairs). TRL's ORPOTrainer, like the authors' code,
        # averages over every chosen token of a batch instead: a long response weighs more and the loss
        # changes with the batching; the two agree when a batch's chosen responses are equally long.
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        losses = -chosen - pref.orpo_lambda * F.logsigmoid(log_odds)
        lam = pref.orpo_lambda
        good, bad, shown = lam * chosen.detach(), lam * rejected.detach(), (chosen, rejected)
    metrics = torch.stack([good, bad, (good > bad).to(good.dtype), good - bad, shown[0].detach(), shown[1].detach()], dim=1)
    return losses, metrics


def sequence_logps(ctx: Context, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability [S], scored tokens [S]) of every sequence of the batch, through the one packing
    contract (kernels/src/attention.py): sequences never attend to each other."""
    from launcher.kernels.attention import model_inputs

    assert batch.sequences is not None and batch.documents is not None, "a preference cache numbers its sequences"
    ids, labels, positions = (torch.from_numpy(a) for a in (batch.input_ids, batch.labels, batch.position_ids))
    owner = torch.from_numpy(np.where(batch.labels != IGNORE_INDEX, batch.sequences, IGNORE_INDEX))
    device, impl = ctx.info.device, ctx.attn_implementation
    cpu = torch.device("cpu")
    # The same layout twice: once for whose token each target is, then (last: the layout the model reads) for the model.
    _, seq = model_inputs(ids, owner, positions, impl, device=device, target_device=cpu)
    inputs, targets = model_inputs(ids, labels, positions, impl, device=device, target_device=cpu)
    with _autocast(ctx):
        logits = ctx.model(**inputs).logits
    logits = logits.float().reshape(-1, logits.shape[-1])
    scored = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits, targets.to(device), ignore_index=IGNORE_INDEX, reduction="none")
    count = len(batch.documents)
    where = seq[scored].to(device)
    logps = torch.zeros(count, dtype=torch.float32, device=device).index_add_(0, where, token_logps[scored.to(device)])
    tokens = torch.bincount(where, minlength=count).to(torch.float32)
    return logps, tokens


def _adapters(model: Any) -> Any:
    """The peft model inside a DDP wrapper or a DeepSpeed engine (None without adapters)."""
    while model is not None and not hasattr(model, "disable_adapter"):
        model = getattr(model, "module", None)
    return model


class Preference:
    name = "preference"
    metric_names = METRICS

    def __init__(self, pref: PreferenceSection, method: str) -> None:
        self.pref = pref
        self.adapters = method in LORA_METHODS  # the reference is the base: the adapters switched off
        self.needs_reference = pref.needs_reference
        self.stored: dict[str, np.ndarray] = {}  # split -> reference log-probability per sequence (full, freeze)
        self.sums: torch.Tensor | None = None  # this step's METRICS summed over its pairs

    def reference(self, ctx: Context, batch: Batch, split: str) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        if self.adapters:
            trainable = [p for p in ctx.model.parameters() if p.requires_grad]
            with torch.no_grad(), _adapters(ctx.model).disable_adapter():
                # peft switches requires_grad off on the adapters too, but FSDP2 reads requires_grad at
                # its first forward (this one) to choose the gradients' reduce dtype and the dtype they
                # are cast back to: with none trainable it casts nothing, and a bf16 gradient meets an
                # fp32 shard at the first backward. The forward reads only peft's switch.
                for param in trainable:
                    param.requires_grad_(True)
                return sequence_logps(ctx, batch)[0]
        assert batch.documents is not None
        return torch.from_numpy(self.stored[split][batch.documents]).to(ctx.info.device, torch.float32)

    def pairs(self, ctx: Context, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self.reference(ctx, batch, split)
        logps, tokens = sequence_logps(ctx, batch)
        return pair_losses(self.pref, logps, tokens, reference)

    def loss_sum(self, ctx: Context, batch: Batch) -> tuple[torch.Tensor, int]:
        losses, metrics = self.pairs(ctx, batch, "train")
        summed = metrics.double().sum(0)
        self.sums = summed if self.sums is None else self.sums + summed
        return losses.sum(), len(losses)

    def step_sums(self) -> torch.Tensor:
        """This step's METRICS summed over its pairs (the loop divides by the pairs), then reset."""
        sums, self.sums = self.sums, None
        return sums if sums is not None else torch.zeros(len(METRICS), dtype=torch.float64)

    @torch.no_grad()
    def evaluate(self, ctx: Context, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cfg, info = ctx.cfg, ctx.info
        micro = cfg.train.micro_batch_size or 1
        rows = len(ctx.val_data)
        total = rows if cfg.train.eval_batches == 0 else min(rows, cfg.train.eval_batches * (cfg.train.global_batch_size or 1))
        mine = row_shares(total, info.rank, info.world_size)
        sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=info.device)
        for start in range(0, len(mine), micro):
            losses, metrics = self.pairs(ctx, ctx.val_data.batch(mine[start : start + micro]), "val")
            sums += torch.cat([losses.double().sum().reshape(1), metrics.double().sum(0), torch.tensor([len(losses)], device=info.device)])
        totals = all_reduce_sum(sums.tolist(), info.device)
        pairs = max(totals[-1], 1.0)
        out: dict[str, Any] = {"step": step, "val_loss": totals[0] / pairs}
        out.update({f"val_{name}": value / pairs for name, value in zip(METRICS, totals[1:-1], strict=True)})
        return out, []


def reference_key(cfg: RunConfig, model_dir: Path, impl: str) -> str:
    """What the stored reference log-probabilities depend on besides the data: the model's files
    (path, size and mtime: hashing 16 GB at every start would cost minutes), dtype and precision, and
    the micro-batches they were computed in (the last bits of a forward depend on its batch's layout)."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
    t, world = cfg.train, cfg.cluster.nodes * cfg.cluster.gpus_per_node
    batches = [t.micro_batch_size, t.global_batch_size, world, cfg.run.seed]
    parts = [str(model_dir.resolve()), files, cfg.model.dtype, cfg.train.precision, cfg.parallel.backend, cfg.method.name, impl, batches]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def store_reference(task: Preference, ctx: Context, folder: Path, key: str) -> Path | None:
    """Compute (once) and load the reference log-probabilities of every training and validation
    sequence: before any step or checkpoint load, so the model is still the reference. Every rank
    runs the same number of forwards (a sharded model needs it); rank 0 writes the file."""
    if not task.needs_reference or task.adapters:
        return None
    path = folder / f"reference-{key}.npz"
    if not path.exists():
        info = ctx.info
        micro = ctx.cfg.train.micro_batch_size or 1
        found: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        was_training = ctx.model.training
        ctx.model.eval()
        for split, data in (("train", ctx.train_data), ("val", ctx.val_data)):
            docs, values = [], []
            for rows, first in _train_batches(ctx) if split == "train" else _val_batches(ctx, micro):
                batch = data.batch(rows)
                assert batch.documents is not None
                kept = np.isin(batch.documents, [d for r in first if r >= 0 for d in range(data.doc_offsets[r], data.doc_offsets[r + 1])])
                docs.append(batch.documents[kept])
                values.append(sequence_logps(ctx, batch)[0].double().cpu().numpy()[kept])
            found[split] = (docs, values)
        ctx.model.train(was_training)
        everyone: list[Any] = [None] * info.world_size
        dist.all_gather_object(everyone, found)
        if info.is_main:
            arrays = {}
            for split, data in (("train", ctx.train_data), ("val", ctx.val_data)):
                out = np.full(int(data.doc_offsets[-1]), math.nan)
                for part in everyone:
                    for docs, values in zip(*part[split], strict=True):
                        out[docs] = values
                arrays[split] = out
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
            np.savez(tmp, train=arrays["train"], val=arrays["val"])
            os.replace(tmp, path)
        dist.barrier()
    with np.load(path) as stored:
        task.stored = {split: np.asarray(stored[split]) for split in ("train", "val")}
    return path


def _train_batches(ctx: Context) -> list[tuple[list[int], list[int]]]:
    """This rank's micro-batches of the first epoch as the loop forms them, each with its rows of the
    first epoch (the last step may reach into the second): the same rows in the same layout make step
    1's forward bit for bit the reference's (loss ln 2, margins 0, on every backend and world size)."""
    t, info, total = ctx.cfg.train, ctx.info, len(ctx.train_data)
    assert t.global_batch_size and t.micro_batch_size and t.gradient_accumulation_steps
    order = GlobalOrder(total, ctx.cfg.run.seed)
    share = t.global_batch_size // info.world_size
    out = []
    for step in range(math.ceil(total / t.global_batch_size)):
        args = (t.global_batch_size, info.rank, info.world_size, t.micro_batch_size, t.gradient_accumulation_steps)
        for a, rows in enumerate(order.step_rows(step, *args)):
            position = step * t.global_batch_size + info.rank * share + a * t.micro_batch_size  # of rows[0]
            out.append((rows, rows[: max(0, total - position)]))
    return out


def _val_batches(ctx: Context, micro: int) -> list[tuple[list[int], list[int]]]:
    """This rank's validation micro-batches, as `Preference.evaluate` forms them (every row its own)."""
    mine = row_shares(len(ctx.val_data), ctx.info.rank, ctx.info.world_size)
    return [(mine[start : start + micro], mine[start : start + micro]) for start in range(0, len(mine), micro)]


def reference_context(cfg: RunConfig, info: Any, model: Any, train: TokenData, val: TokenData, impl: str) -> Context:
    """The little of a Context the reference pass reads (no optimizer, order or reporter yet)."""
    nothing = cast(Any, None)
    return Context(cfg, info, model, nothing, train, val, nothing, impl, nothing, cfg.parallel.backend)
