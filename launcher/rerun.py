"""A run directory run again: the settings it may not change, and whether its training is done.

No torch, decided from plan.json, the checkpoint manifests and metrics.jsonl before anything is
written or started (`launcher plan`, `run`, `submit`, `prepare` call it through cli._planned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.config.errors import ConfigError, Problem, one_line
from launcher.config.schema import RunConfig
from launcher.runfiles import read_small

# What a run directory may change between two runs into it: how long and how often, where, how
# fast, on how many ranks (a checkpoint is resharded to any world size, so the micro-batch and the
# accumulation that follow from it may change too; the global batch may not). Every other setting
# changes what is trained (model, method, data, optimiser, seed, global batch, sequence length,
# precision, backend, reduction dtype, task), and a key added to the schema counts as one until it
# is listed here: the run's checkpoints and metrics.jsonl would no longer be what config.yaml says.
FREE = (
    "run.name",
    "run.output_dir",
    "model.local_dir",
    "data.num_proc",
    "data.cache_dir",
    "data.max_dropped_fraction",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",
    "train.auto_micro_batch",
    "train.gradient_accumulation_steps",
    "train.activation_checkpointing",
    "train.compile",
    "train.plot",
    "train.log_every",
    "train.eval_every",
    "train.eval_strategy",
    "train.eval_batches",
    "train.eval_exact_match",
    "train.early_stopping",
    "train.report_to",
    "parallel.zero_stage",
    "parallel.offload_optimizer",
    "parallel.offload_params",
    "parallel.nvme_path",
    "parallel.fsdp.reshard_after_forward",
    "parallel.fsdp.hsdp",
    "parallel.fsdp.cpu_offload",
    "parallel.fsdp.defer_grad_sync",
    "kernels",
    "checkpoint",
    "cluster",
)


class RunDone(Exception):
    """The run's training is finished: `str()` is what to tell the user (nothing was started)."""


def _free(key: str) -> bool:
    return any(key == free or key.startswith(free + ".") for free in FREE)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value)
    return one_line(text if len(text) <= 80 else text[:77] + "...")


def trained(run_dir: Path) -> bool:
    """Whether the folder holds a training's results (a checkpoint folder, or logged steps)."""
    root = run_dir / "checkpoints"
    return (root.is_dir() and any(root.glob("step-*"))) or bool(read_small(run_dir / "metrics.jsonl", limit=1))


def previous_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config of the plan.json `launcher plan` last wrote there, or None."""
    try:
        data = json.loads(read_small(run_dir / "plan.json", limit=1 << 24) or "null")
    except (ValueError, RecursionError):
        return None
    config = data.get("config") if isinstance(data, dict) else None
    return config if isinstance(config, dict) else None


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every setting outside FREE that differs, in the schema's order. A key only
    one side knows (a plan.json of an older launcher) is not a change the user made."""
    before, after = _flat(old), _flat(new)
    return [(k, before[k], value) for k, value in after.items() if k in before and not _free(k) and before[k] != value]


def check_changes(run_dir: Path, config: dict[str, Any], allow_mismatch: bool, key: str) -> list[str]:
    """Refuse (ConfigError, one line per difference) to plan a run into a directory that holds the
    training of other settings: its config.yaml and plan.json would be overwritten and its
    checkpoints resumed as if nothing had changed. With checkpoint.allow_mismatch the differences
    come back as warning lines instead."""
    old = previous_config(run_dir) if trained(run_dir) else None
    changes = changed_settings(old, config) if old is not None else []
    if not changes:
        return []
    lines = [f"{name}: {_shown(before)} -> {_shown(after)}" for name, before, after in changes]
    if allow_mismatch:
        return [f"warning: checkpoint.allow_mismatch: {line} (config.yaml now records the new value)" for line in lines]
    newest = sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
    branch = f"checkpoint.resume={newest[0]} --out NEW_DIR" if newest else "--out NEW_DIR"
    problems = [Problem(name, f"{_shown(before)} -> {_shown(after)}", "") for name, before, after in changes]
    error = ConfigError(problems)
    error.args = (
        "\n".join(
            [
                one_line(f"error: {key} {run_dir} holds a run trained with other settings; these would change its training:"),
                *(f"  {line}" for line in lines),
                one_line(
                    f"fix: write the new run elsewhere (--out NEW_DIR), or branch from a checkpoint of this one ({branch}); "
                    "keep the old values to continue this run"
                ),
            ]
        ),
    )
    raise error


def finished(cfg: RunConfig, saved: dict[str, Any] | None, old: dict[str, Any] | None) -> str | None:
    """Why the checkpoint `saved` (the newest, resumed from by `checkpoint.resume: auto`) ends the
    training this config asks for, or None: there are steps to run."""
    if saved is None or cfg.checkpoint.resume != "auto":  # a named checkpoint is resumed as asked (to evaluate it, say)
        return None
    step = saved.get("step")
    target = cfg.train.max_steps
    if target is None:  # epochs: the count the ranks resolved, while the epochs and the data are the same
        same = old is not None and old.get("train", {}).get("epochs") == cfg.train.epochs
        target = saved.get("max_steps") if same else None
    if not isinstance(step, int) or not isinstance(target, int):
        return None
    if step >= target:
        return f"trained to step {step} of {target} (train.max_steps)"
    stopping = cfg.train.early_stopping
    state = saved.get("early_stopping")
    if stopping.metric and isinstance(state, dict) and isinstance(state.get("waited"), int) and state["waited"] >= stopping.patience:
        return (
            f"stopped early at step {step}: {stopping.metric} had not improved for {stopping.patience} evaluation(s), "
            f"best at step {state.get('best_step')} (train.early_stopping.patience)"
        )
    return None


def _last_records(metrics: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training record and the last evaluation record of metrics.jsonl."""
    train = evaluation = None
    for line in (read_small(metrics, limit=1 << 22, tail=True) or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record:
            train = record
        elif isinstance(record, dict) and "val_loss" in record:
            evaluation = record
    return train, evaluation


def _numbers(record: dict[str, Any]) -> str:
    shown = [
        f"{k} {v:.4f}"
        for k, v in record.items()
        if k not in ("step", "elapsed", "lr", "tokens", "pad_tokens", "tokens_seen", "tokens_per_s", "peak_mem_gib", "grad_norm")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    ]
    return f"step {record.get('step')}: " + ", ".join(shown[:6])


def done_message(run_dir: Path, why: str, cfg: RunConfig) -> str:
    """What a finished run holds and what to do next: the lines `launcher run` prints instead of starting it."""
    from launcher.plan.resume import resume_candidates

    found, _ = resume_candidates(run_dir / "checkpoints", "auto")
    final = found[0] if found else run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    train, evaluation = _last_records(metrics)
    rows = [("checkpoint", str(final))]
    if train is not None or evaluation is not None:
        rows.append(("metrics", f"{metrics} (" + "; ".join(_numbers(r) for r in (train, evaluation) if r is not None) + ")"))
    evals = [str(run_dir / name) for name in ("eval.json", "eval_predictions.jsonl") if (run_dir / name).is_file()]
    if evals:
        rows.append(("eval", ", ".join(evals)))
    if (run_dir / "loss.png").is_file():
        rows.append(("plot", str(run_dir / "loss.png")))
    best = " --best" if cfg.train.early_stopping.metric else ""
    rows.append(("export", f"launcher export {run_dir}{best} --out {run_dir / 'export'}"))
    rows.append(
        ("more", f"raise train.max_steps to train on from {final.name}; to evaluate it again: checkpoint.resume={final} --out NEW_DIR")
    )
    width = max(len(name) for name, _ in rows)
    body = [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(one_line(line) for line in [f"launcher: {run_dir} is done: {why}; nothing to run", *body])
