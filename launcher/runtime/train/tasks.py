"""A task owns its loss, its evaluation and its metrics; the loop asks it for both and stays one loop.

- causal LM: next-token loss over labelled tokens (loop.token_loss_sum: the packing contract and the
  chunked head live there); evaluation = validation loss, perplexity, and on held-out prompts greedy
  answers scored by exact match and ROUGE-L (the `rouge-score` package).
- sequence classification: cross-entropy of the pooled logits against each row's class; evaluation
  = validation loss, accuracy, macro precision / recall / F1 and the confusion matrix, computed with
  scikit-learn on rank 0 from every rank's predictions (gathered, deduplicated, in dataset order);
  each prediction carries its row's text (decoded), as a generated answer carries its prompt.

Every rank runs the same number of forwards in an evaluation (sharded models need it); a rank short
of rows runs empty ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.runtime.data.packing import IGNORE_INDEX, Batch
from launcher.runtime.parallel.dist import all_reduce_sum, row_shares
from launcher.runtime.train.loop import Context, _autocast, token_loss_sum

Evaluation = tuple[dict[str, Any], list[dict[str, Any]]]  # (metrics, predictions in dataset order)


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records on every rank, deduplicated by index, in dataset order."""
    everyone: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, records)
    unique = {record["index"]: record for part in everyone for record in part}
    return [unique[i] for i in sorted(unique)]


def _tokenizer(ctx: Context) -> Any:
    """The run's tokenizer, loaded at its first use (the orchestrator gives one only for generation)."""
    if ctx.tokenizer is None:
        from launcher.runtime.model.build import LazyTokenizer
        from launcher.runtime.model.files import model_dir

        ctx.tokenizer = LazyTokenizer(model_dir(ctx.cfg.model))
    return ctx.tokenizer


class CausalLM:
    name = "causal_lm"

    def loss_sum(self, ctx: Context, batch: Batch) -> tuple[torch.Tensor, int]:
        return token_loss_sum(ctx, batch)

    @torch.no_grad()
    def evaluate(self, ctx: Context, step: int) -> Evaluation:
        cfg, info = ctx.cfg, ctx.info
        micro = cfg.train.micro_batch_size or 1
        total = min(len(ctx.val_data), cfg.train.eval_batches * (cfg.train.global_batch_size or 1))
        mine = row_shares(total, info.rank, info.world_size)
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        count = 0
        for start in range(0, len(mine), micro):
            summed, n = self.loss_sum(ctx, ctx.val_data.batch(mine[start : start + micro]))
            loss_sum += summed.detach().double()
            count += n
        answers = self.generate(ctx)
        loss, tokens = all_reduce_sum([float(loss_sum), float(count)], info.device)
        metrics: dict[str, Any] = {"step": step, "val_loss": loss / max(tokens, 1)}
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        predictions = _gather(answers) if cfg.train.eval_exact_match else []
        if predictions:  # scored on rank 0 alone: rouge-score imports nltk and scipy (1.2 s, 170 MB a process)
            scores = [0.0, 0.0]
            if info.rank == 0:
                from rouge_score import rouge_scorer

                scorer = rouge_scorer.RougeScorer(["rougeL"])
                for record in predictions:
                    record["exact"] = record["prediction"].strip() == record["reference"].strip()
                    record["rouge_l"] = scorer.score(record["reference"], record["prediction"])["rougeL"].fmeasure
                scores = [
                    sum(r["exact"] for r in predictions) / len(predictions),
                    sum(r["rouge_l"] for r in predictions) / len(predictions),
                ]
            metrics["exact_match"], metrics["rouge_l"] = all_reduce_sum(scores, info.device)  # every rank's stopper reads them
        return metrics, predictions

    def generate(self, ctx: Context) -> list[dict[str, Any]]:
        """Greedy answers to this rank's share of the held-out prompts.

        The prompts go in groups, each group one forward per new token: its unfinished sequences as
        documents of one packed row (kernels/src/attention.py, `generation_inputs`), so a token of
        32 answers costs one forward, not 32. No KV cache: each forward recomputes the sequences,
        which the old one-prompt-at-a-time loop did as well. A group holds at most a micro-batch's
        tokens (one row's, when the model must return every position's logits). Every rank runs
        the same number of forwards (sharded models gather parameters in each): the group count is
        known to all of them from the prompts alone, and a rank with nothing left runs a
        one-token forward."""
        n = min(ctx.cfg.train.eval_exact_match, len(ctx.eval_prompts))
        if n == 0 or ctx.tokenizer is None:
            return []
        from launcher.kernels.attention import generation_inputs

        info, tokenizer, t = ctx.info, ctx.tokenizer, ctx.cfg.train
        prompts = ctx.eval_prompts[:n]
        stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
        new_tokens = max(len(tokenizer.encode(p["answer"], add_special_tokens=False)) for p in prompts) + 1
        flatten = ctx.cfg.method.name != "prompt_tuning"  # peft prepends virtual tokens: rows as they are
        keep = flatten and _takes_logits_to_keep(ctx.model)
        budget = ctx.cfg.data.max_seq_len * ((t.micro_batch_size or 1) if keep else 1)
        shares = [[i for i in row_shares(n, r, info.world_size) if i >= 0] for r in range(info.world_size)]
        groups = [_groups([len(prompts[i]["prompt_ids"]) + new_tokens for i in share], budget) for share in shares]
        mine = [[shares[info.rank][i] for i in group] for group in groups[info.rank]]
        answers: dict[int, list[int]] = {}
        for g in range(max(len(gs) for gs in groups)):
            indices = mine[g] if g < len(mine) else []
            sequences = {i: list(prompts[i]["prompt_ids"]) for i in indices}
            finished: set[int] = set()
            for _ in range(new_tokens):
                active = [i for i in indices if i not in finished]
                batch = [sequences[i] for i in active] or [prompts[0]["prompt_ids"][:1]]
                kwargs, last = generation_inputs(batch, ctx.attn_implementation, flatten=flatten, keep_logits=keep, device=info.device)
                with _autocast(ctx):
                    logits = ctx.model(**kwargs).logits
                if not flatten:  # the rows' own positions are the last `width` (after any virtual tokens)
                    logits = logits[:, -kwargs["input_ids"].shape[1] :]
                picked = logits.reshape(-1, logits.shape[-1])[last.to(logits.device)].argmax(-1).tolist()
                for i, token in zip(active, picked[: len(active)], strict=True):
                    sequences[i].append(token)
                    if token in stop:
                        finished.add(i)
            for i in indices:
                answers[i] = sequences[i][len(prompts[i]["prompt_ids"]) :]
        out = []
        for index in sorted(answers):
            generated = answers[index]
            cut = next((i for i, tok in enumerate(generated) if tok in stop), len(generated))
            text = tokenizer.decode(prompts[index]["prompt_ids"], skip_special_tokens=True)
            out.append(
                {
                    "index": index,
                    "prompt": text,
                    "reference": prompts[index]["answer"],
                    "prediction": tokenizer.decode(generated[:cut]).strip(),
                }
            )
        return out


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of these sequences (indices) whose lengths add up to at most `budget` tokens
    (a longer one alone)."""
    out: list[list[int]] = []
    size = 0
    for i, n in enumerate(lengths):
        if out and size + n <= budget:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size = n
    return out


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's own forward (under any wrapper or peft) takes `logits_to_keep`."""
    import inspect

    from launcher.runtime.model.build import unwrap

    inner = unwrap(model)
    getter = getattr(inner, "get_base_model", None)
    base = getter() if callable(getter) else inner
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class Classification:
    name = "classification"

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def logits(self, ctx: Context, batch: Batch) -> torch.Tensor:
        device = ctx.info.device
        ids = torch.from_numpy(batch.input_ids).to(device)
        assert batch.lengths is not None
        real = torch.from_numpy(batch.lengths).to(device)
        mask = (
            torch.arange(ids.shape[1], device=device)[None] < real.clamp(min=1)[:, None]
        ).long()  # padding at the end; an empty row sees its first token
        with _autocast(ctx):
            return ctx.model(input_ids=ids, attention_mask=mask).logits

    def loss_sum(self, ctx: Context, batch: Batch) -> tuple[torch.Tensor, int]:
        assert batch.classes is not None, "a classification cache has classes"
        targets = torch.from_numpy(batch.classes).to(ctx.info.device)
        logits = self.logits(ctx, batch)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"), int(
            (batch.classes != IGNORE_INDEX).sum()
        )

    @torch.no_grad()
    def evaluate(self, ctx: Context, step: int) -> Evaluation:
        from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

        info, data = ctx.info, ctx.val_data
        tokenizer = _tokenizer(ctx)
        micro = ctx.cfg.train.micro_batch_size or 1
        mine = row_shares(len(data), info.rank, info.world_size)
        records: list[dict[str, Any]] = []
        loss_sum = 0.0
        for start in range(0, len(mine), micro):
            batch = data.batch(mine[start : start + micro])
            assert batch.classes is not None and batch.rows is not None
            logits = self.logits(ctx, batch).float()
            targets = torch.from_numpy(batch.classes).to(info.device)
            loss_sum += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            assert batch.lengths is not None
            for i, (row, label, predicted) in enumerate(zip(batch.rows, batch.classes.tolist(), logits.argmax(-1).tolist())):
                if row >= 0:  # the text as the model read it (decoded), so a mistake can be read
                    text = tokenizer.decode(batch.input_ids[i, : batch.lengths[i]].tolist(), skip_special_tokens=True)
                    records.append({"index": row, "text": text, "label": self.labels[label], "prediction": self.labels[predicted]})
        (loss,) = all_reduce_sum([loss_sum], info.device)
        predictions = _gather(records)
        truth = [r["label"] for r in predictions]
        guess = [r["prediction"] for r in predictions]
        precision, recall, f1, _ = precision_recall_fscore_support(truth, guess, labels=self.labels, average="macro", zero_division=0)
        metrics: dict[str, Any] = {
            "step": step,
            "val_loss": loss / max(len(predictions), 1),
            "accuracy": float(accuracy_score(truth, guess)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "confusion_matrix": confusion_matrix(truth, guess, labels=self.labels).tolist(),
        }
        return metrics, predictions


def build_task(task: str, labels: list[str] | None, preference: Any = None, method: str = "full") -> Any:
    """The task object the loop asks for losses and evaluations (preference: train/preference.py)."""
    if task == "preference":
        from launcher.runtime.train.preference import Preference

        return Preference(preference, method)
    if task == "classification":
        assert labels, "the prepared data names the classes"
        return Classification(labels)
    return CausalLM()
