"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, on rank 0 only.

The only module that imports them, each lazily and only when listed. They get exactly the records
metrics.jsonl gets (numbers only: a confusion matrix stays in eval.json), step records under
`train/`, evaluations under `eval/`. Everything lands in the run directory unless the user points a
tracker elsewhere (WANDB_MODE, MLFLOW_TRACKING_URI), so a compute node without network trains the
same. A tracker that fails is dropped with one warning: a dashboard never stops a training run.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from launcher.config.errors import one_line
from launcher.runfiles import read_small, replace_file

Kind = Literal["train", "eval"]


class Tracker(Protocol):
    where: str  # where its records go, for the one line printed at the start

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run rewinds to its checkpoint: purge_step hides the events logged after that step
        # by the attempt before, as metrics.jsonl is cut there.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.where = f"tensorboard --logdir {run_dir / 'tensorboard'}"

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps what it logged (one flush per log step is cheap)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """Offline unless WANDB_MODE says otherwise; files in RUN_DIR/wandb (`wandb sync` them later)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], start_step: int) -> None:
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        # One id per run directory, so a resumed run continues the same W&B run.
        id_file = folder / "launcher-run-id"
        run_id = (read_small(id_file, limit=256) or "").strip() or uuid.uuid4().hex[:16]
        replace_file(id_file, run_id + "\n")  # never through a link planted there
        mode: Literal["offline"] | None = None if os.environ.get("WANDB_MODE") else "offline"  # None: wandb reads WANDB_MODE
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "launcher",
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=mode,
            settings=wandb.Settings(console="off", silent=True),  # our own stdout stays ours
        )
        offline = (mode or os.environ.get("WANDB_MODE")) in ("offline", "dryrun")
        self.where = f"wandb offline in {folder} (upload: wandb sync {folder}/offline-run-*)" if offline else f"wandb {self.run.url}"

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    """A file store in RUN_DIR/mlruns unless MLFLOW_TRACKING_URI is set (`mlflow ui --backend-store-uri`)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], start_step: int) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless this is set; the file store needs no server nor database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        self.where = f"mlflow {uri}"
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "launcher"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        id_file = run_dir / "mlflow-run-id"  # a resumed run continues the same MLflow run
        saved = (read_small(id_file, limit=256) or "").strip()  # a FIFO or a folder there is not read
        if saved:
            self.run_id = saved
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            replace_file(id_file, self.run_id + "\n")
            params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(key, value, now, step) for key, value in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, Callable[[Path, str, dict[str, Any], int], Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


class Trackers:
    """The trackers that are still working; each call is guarded, a failure drops that one."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.active = dict(trackers)

    def log(self, record: dict[str, Any], kind: Kind) -> None:
        """One metrics.jsonl record; its `step` is the x axis."""
        if not self.active or "step" not in record:
            return
        values = scalars(record, kind)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, int(record["step"]))
            except Exception as exc:
                self._drop(name, exc, "logging")

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as exc:
                self._drop(name, exc, "closing")
        self.active.clear()

    def _drop(self, name: str, exc: BaseException, doing: str) -> None:
        self.active.pop(name, None)
        warn(name, exc, doing)


def open_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any], start_step: int) -> Trackers:
    """Start each tracker in `names` (train.report_to); one that cannot start is left out with a warning."""
    started: dict[str, Tracker] = {}
    run_name = str(config.get("run", {}).get("name", run_dir.name))
    cluster = config.get("cluster", {})
    if cluster.get("env"):  # its values may be tokens (config.yaml is owner-only for that): the names go, not the values
        config = {**config, "cluster": {**cluster, "env": sorted(cluster["env"])}}
    for name in dict.fromkeys(names):
        try:
            started[name] = TRACKERS[name](run_dir, run_name, config, start_step)
        except Exception as exc:
            warn(name, exc, "starting")
    if started:
        print("launcher: report_to: " + "; ".join(tracker.where for tracker in started.values()), flush=True)
    return Trackers(started)


def scalars(record: dict[str, Any], kind: Kind) -> dict[str, float]:
    """The record's numbers under `train/` or `eval/`; `step` is the axis, not a value."""
    return {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def warn(name: str, exc: BaseException, doing: str) -> None:
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    print(
        one_line(f"warning: train.report_to: {name} failed while {doing} ({type(exc).__name__}: {text}); dropped, training goes on"),
        file=sys.stderr,
        flush=True,
    )
