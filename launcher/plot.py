"""loss.png: training and validation loss above the learning rate, against step, from metrics.jsonl.

Drawn by the `launcher run` process once the ranks have exited (so no rank spends its time on it),
or on demand by `launcher plot RUN_DIR`. matplotlib is imported here only, lazily, on the Agg
canvas (no pyplot, no display, no global figure state). Imports no torch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILE = "loss.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short (a run killed mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key, by step; a resumed run's repeated step keeps its last value."""
    points = {r["step"]: r[key] for r in records if isinstance(r.get(key), int | float)}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def loss_figure(records: list[dict[str, Any]]) -> Figure:
    """The figure: loss (log scale; train, validation) on top, the learning rate below, shared steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5.5), dpi=100)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    train, val, lr = _series(records, "loss"), _series(records, "val_loss"), _series(records, "lr")
    if train[0]:
        loss_ax.plot(*train, label="train")
    if val[0]:
        loss_ax.plot(*val, marker="o", label="validation")
    loss_ax.set_ylabel("loss")
    if train[0] or val[0]:
        loss_ax.set_yscale("log")
        loss_ax.legend()
    lr_ax.plot(*lr, color="tab:green", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl into `out` (default RUN_DIR/loss.png); return the file written.
    Raises FileNotFoundError without metrics.jsonl and ValueError when it holds no step records."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    metrics = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step records yet")
    fig = loss_figure(records)
    target = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    try:  # a reader never sees half a PNG
        with os.fdopen(fd, "wb") as handle:
            FigureCanvasAgg(fig).print_png(handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def plot_after_run(run_dir: str | Path, enabled: bool) -> Path | None:
    """`launcher run`, once the ranks have exited: draw loss.png when train.plot is on. A plot that
    cannot be drawn is a warning: the run itself succeeded."""
    if not enabled:
        return None
    started = time.perf_counter()
    try:
        path = plot_run(run_dir)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: matplotlib removed from the environment
        print(f"launcher: warning: {PLOT_FILE} not drawn ({exc}); try `launcher plot {run_dir}`", file=sys.stderr, flush=True)
        return None
    print(f"launcher: plot {path} ({time.perf_counter() - started:.1f} s)", flush=True)
    return path
