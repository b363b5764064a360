"""`launcher eval RUN [--data FILE] [--step N]`: a trained checkpoint's metrics on any file.

The evaluation is the training's own: a one-process world (gloo on CPU, NCCL on one GPU) planned
from the run's config.yaml, resuming the chosen checkpoint at its own step, so the loop finds
nothing left to train and runs the task's evaluation once (runtime/train/tasks.py, the same data
pipeline, loss, packing contract and metrics; the first process resharding a checkpoint saved at
another world size, as any resume does). It is planned into a folder of its own
(RUN/evals/<file>-step-N by default), which keeps eval.json and eval_predictions.jsonl.

Without --data the run's own validation set is evaluated exactly as training evaluated it (the same
rows, train.eval_batches and train.eval_exact_match): the numbers equal the run's evaluation at that
step. With --data FILE every row of FILE counts; it is read as the run's data.val_path would be
(the run's template and columns), so rows that are also training rows are left out, and the data
report says how many.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, RunConfig, load_config
from launcher.config.errors import Problem

MARKER = "evaluated.json"  # what an eval folder was made from; such a folder may be replaced by the next eval


def run_config(run: Path) -> Path:
    """RUN/config.yaml, refused (one line) for a folder that is not a run directory."""
    if not (run / "plan.json").is_file() or not (run / "config.yaml").is_file():
        raise ConfigError(
            [Problem(str(run), "is not a run directory (no plan.json and config.yaml)", "give a folder `launcher run` trained in")]
        )
    return run / "config.yaml"


def checkpoint_of(run: Path, step: int | None) -> Path:
    """The checkpoint to try (the newest intact one, or --step N's), refused as export refuses it."""
    from launcher.runtime.state import checkpoint as ckpt
    from launcher.runtime.state.export import ExportError, pick_checkpoint

    try:
        return pick_checkpoint(run, step)
    except (ExportError, ckpt.CheckpointError) as exc:
        raise ConfigError([Problem("--step" if step is not None else str(run), str(exc), "train first, or choose a saved step")]) from None


def eval_overrides(
    cfg: RunConfig, folder: Path, step: int, device: str, data: str | None, rows: int | None, prompts: int | None
) -> list[str]:
    """The run's config, changed only where evaluating one checkpoint on one process needs it."""
    over = [
        "cluster.nodes=1",
        "cluster.gpus_per_node=1",
        f"cluster.accelerator={device}",
        "train.gradient_accumulation_steps=null",  # derived again for one rank: the global batch (and eval budget) stays
        "train.epochs=null",
        f"train.max_steps={step}",  # resumed at its own step: nothing left to train, the loop evaluates once
        "train.eval_strategy=steps",
        "train.eval_every=0",
        "train.early_stopping.metric=",
        "train.report_to=[]",
        "train.plot=false",
        "optim.warmup_ratio=0",
        f"optim.warmup_steps={min(cfg.optim.warmup_steps, step)}",
        "checkpoint.save_strategy=steps",
        f"checkpoint.resume={folder}",
        "checkpoint.allow_mismatch=true",  # another data set is the point (its fingerprint differs)
    ]
    if data is not None:
        over += [f"data.val_path={data}", "data.val_split="]
    if rows is not None:  # every row of the file
        over.append(f"train.eval_batches={max(1, math.ceil(rows / (cfg.train.global_batch_size or 1)))}")
    if prompts is not None:
        over.append(f"train.eval_exact_match={prompts}")
    return over


def _default_device(cfg: RunConfig) -> str:
    if cfg.cluster.accelerator != "cuda":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _out_dir(run: Path, out: str | None, data: str | None, step: int) -> Path:
    """--out, or RUN/evals/<file stem>-step-N; an earlier eval there is replaced, anything else refused."""
    name = f"{Path(data).name.split('.')[0] if data else 'validation'}-step-{step}"
    folder = Path(out).absolute() if out else run.absolute() / "evals" / name
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError([Problem("--out", f"{folder} is not a folder", "choose a new folder")])
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise ConfigError([Problem("--out", f"{folder} holds other files", "choose a new folder")])
        shutil.rmtree(folder)
    return folder


def evaluate_run(
    run_dir: str,
    data: str | None = None,
    step: int | None = None,
    out: str | None = None,
    device: str | None = None,
    prompts: int | None = None,
) -> int:
    """Plan and run the one-process evaluation; print its metrics and where its files are."""
    from launcher.plan import build_plan, write_run_dir
    from launcher.run_local import run_local
    from launcher.runfiles import replace_file
    from launcher.runlock import holding

    run = Path(run_dir)
    recipe = run_config(run)
    if data is not None and not Path(data).exists():
        raise ConfigError(
            [Problem("--data", f"{data}: no such file or folder", "give a data file (jsonl, json, parquet, csv) or a saved data set")]
        )
    data = str(Path(data).absolute()) if data is not None else None
    cfg = load_config(str(recipe), [])
    folder = checkpoint_of(run, step)
    step = int(folder.name.removeprefix("step-"))
    device = device or _default_device(cfg)
    rows = None
    if data is not None:  # the file prepared first (the report is printed): its row count sets the budget
        from launcher.runtime.__main__ import prepare

        probe = load_config(str(recipe), eval_overrides(cfg, folder, step, device, data, None, prompts))
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            cache = _prepared(prepare, probe)
        rows = int(json.loads((cache / "meta.json").read_text())["val"]["rows"])
    eval_cfg = load_config(str(recipe), eval_overrides(cfg, folder, step, device, data, rows, prompts))
    target = _out_dir(run, out, data, step)
    plan = build_plan(eval_cfg, str(target))
    captured = io.StringIO()
    with holding(str(target)):
        write_run_dir(plan)
        replace_file(target / MARKER, json.dumps({"run": str(run.absolute()), "checkpoint": str(folder), "data": data}) + "\n")
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            code = run_local(plan)
    text = captured.getvalue()
    for line in text.splitlines():  # the file's own report: rows read, dropped, and left out as training rows
        if data is not None and line.startswith("data:") and "(validation)" in line:
            print(line)
    result = target / "eval.json"
    if code != 0 or not result.is_file():
        print(text[-4000:], end="", file=sys.stderr)
        print(f"error: the evaluation failed (exit {code}); its log: {target / 'logs' / 'launcher.log'}", file=sys.stderr)
        return code or 1
    metrics = json.loads(result.read_text())
    print(f"eval {run} step {step} on {data or 'its validation set'}:")
    for key, value in metrics.items():
        if key != "step":
            print(f"  {key:<16} {value:.6g}" if isinstance(value, float) else f"  {key:<16} {value}")
    print(f"metrics {result}\npredictions {target / 'eval_predictions.jsonl'}")
    return 0


def _prepared(prepare: Any, cfg: RunConfig) -> Path:
    from launcher.runtime.data import DataError
    from launcher.runtime.model.files import ModelError

    try:
        return Path(prepare(cfg))
    except (DataError, ModelError) as exc:
        raise ConfigError(
            [Problem("--data", str(exc), "check the file: it is read with the run's data.template and data.columns")]
        ) from None
