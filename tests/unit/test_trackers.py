"""train.report_to: the trackers get the records metrics.jsonl gets, offline, and never stop a run.

Records are fed to the tracker module directly (no training processes); each tracker's own files
are read back with its own reader.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config import load_config
from launcher.config.errors import ConfigError
from launcher.runtime.train.metrics import Reporter
from launcher.runtime.train.trackers import Trackers, open_trackers, scalars

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
CONFIG = {"run": {"name": "tiny"}, "optim": {"lr": 0.001, "scheduler": "constant"}, "cluster": {"env": {"HF_TOKEN": "hf_secret"}}}


def step_record(step: int) -> dict[str, Any]:
    """A step record as loop.py makes it (Reporter.step adds peak_mem_gib)."""
    return {
        "step": step,
        "loss": 2.0 / step,
        "lr": 1e-3 * step,
        "grad_norm": 0.5,
        "tokens": 512,
        "tokens_per_s": 9000.0,
        "elapsed": 0.1 * step,
    }


EVAL = {"step": 4, "val_loss": 1.25, "val_ppl": 3.49, "accuracy": 0.75, "confusion_matrix": [[3, 1], [0, 4]], "labels": ["a", "b"]}


def feed(run_dir: Path, names: list[str], start_step: int = 0, steps: range = range(1, 5)) -> list[dict[str, Any]]:
    """Drive a rank-0 Reporter as the loop does; return what metrics.jsonl holds."""
    reporter = Reporter(run_dir, True, 4, start_step, open_trackers(names, run_dir, CONFIG, start_step))
    for step in steps:
        reporter.step(step_record(step))
    reporter.evaluation(EVAL, [])
    reporter.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_are_the_numbers_of_a_record() -> None:
    assert scalars({"step": 3, "loss": 1.5, "tokens": 8, "flag": True, "cm": [[1]], "name": "x"}, "train") == {
        "train/loss": 1.5,
        "train/tokens": 8.0,
    }


def test_tensorboard_gets_the_metrics_jsonl_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = feed(tmp_path, ["tensorboard"])
    assert f"launcher: report_to: tensorboard --logdir {tmp_path / 'tensorboard'}\n" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    train = [r for r in written if "loss" in r]
    assert {f"train/{k}" for k in train[0] if k != "step"} <= tags  # every number of the record, peak_mem_gib included
    assert {"eval/val_loss", "eval/accuracy"} <= tags and not any("confusion" in t or "labels" in t for t in tags)
    for key in ("loss", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train]
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [(4, 1.25)]


def test_tensorboard_resumed_run_rewinds_like_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    feed(tmp_path, ["tensorboard"])
    feed(tmp_path, ["tensorboard"], start_step=2, steps=range(3, 5))  # resumed from a step-2 checkpoint
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # purge_step dropped the first run's 3, 4


def test_wandb_is_offline_and_writes_under_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account: offline must not ask for one
    feed(tmp_path, ["wandb"])
    assert f"launcher: report_to: wandb offline in {tmp_path / 'wandb'} (upload: wandb sync" in capsys.readouterr().out
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb" / "launcher-run-id").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    logged = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in logged and b"constant" in logged  # the records and the config went in
    assert b"HF_TOKEN" in logged and b"hf_secret" not in logged  # an environment variable's name, never its value


def test_mlflow_file_store_under_the_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    written = feed(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run((tmp_path / "mlflow-run-id").read_text().strip())
    assert run.data.params["optim.lr"] == "0.001" and run.info.status == "FINISHED"
    assert run.data.params["cluster.env"] == "['HF_TOKEN']"  # the name of an environment variable, never its value
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in written if "loss" in r]
    assert run.data.metrics["eval/val_loss"] == 1.25


class Broken:
    where = "nowhere"

    def __init__(self) -> None:
        self.calls = 0

    def log(self, values: dict[str, float], step: int) -> None:
        self.calls += 1
        raise ConnectionError("server said no\nsecond line")

    def close(self) -> None:
        raise AssertionError("a dropped tracker is not closed")


class Recording:
    where = "a list"

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append((step, values))

    def close(self) -> None:
        self.closed = True


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken, good = Broken(), Recording()
    reporter = Reporter(tmp_path, True, 4, 0, Trackers({"wandb": broken, "tensorboard": good}))
    for step in range(1, 5):
        reporter.step(step_record(step))
    reporter.evaluation(EVAL, [])
    reporter.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: train.report_to: wandb failed while logging (ConnectionError: server said no second line); dropped, training goes on"
    ]
    assert broken.calls == 1 and good.closed
    assert [step for step, _ in good.logged] == [1, 2, 3, 4, 4] and good.logged[-1][1]["eval/val_loss"] == 1.25
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5  # metrics.jsonl is untouched by it


def test_a_tracker_that_cannot_start_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import launcher.runtime.train.trackers as trackers

    def refuse(*args: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "tensorboard"))

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", refuse)
    opened = open_trackers(["tensorboard"], tmp_path, CONFIG, 0)
    assert opened.active == {}
    assert capsys.readouterr().err.startswith("warning: train.report_to: tensorboard failed while starting (PermissionError: ")


def test_unknown_tracker_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, ["train.report_to=[tensorbored]"])
    assert caught.value.keys == ["train.report_to"] and "tensorbored" in str(caught.value)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_tracker_not_installed_is_one_error_at_plan_time(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [f"train.report_to=[{name}]"])
    assert (
        str(caught.value)
        == f"error: train.report_to: {name} is not installed; pip install 'launcher[{name}]', or remove it from train.report_to"
    )


def test_a_tracker_listed_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="lists tensorboard twice"):
        load_config(TINY, ["train.report_to=[tensorboard,tensorboard]"])


def test_default_is_no_tracker() -> None:
    assert load_config(TINY).train.report_to == []


def test_the_progress_line_shows_mfu_on_cuda_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.config import load_config
    from launcher.plan import build_plan
    from launcher.runtime.train.metrics import mfu_per_token_s

    root = Path(__file__).resolve().parents[2] / "recipes"
    gpu = build_plan(load_config(root / "llama3-8b-full-fsdp.yaml"), "/scratch/x")
    per_token = mfu_per_token_s(gpu.estimate, gpu.topology["world_size"], cuda=True)
    # 8B trains at about 6 x 8e9 FLOPs a token (plus attention): 9,000 tokens/s over its GPUs' peak.
    expected = 9000.0 * gpu.estimate["model_flops_per_token"] / (gpu.topology["world_size"] * gpu.estimate["peak_tflops"] * 1e12)
    assert 6 * 7.5e9 < gpu.estimate["model_flops_per_token"] < gpu.estimate["flops_per_token"] * 1.0001
    assert per_token * 9000.0 == pytest.approx(expected)
    cpu = build_plan(load_config(root / "tiny-cpu.yaml"), "/scratch/y")
    assert mfu_per_token_s(cpu.estimate, 2, cuda=False) == 0.0
    reporter = Reporter(tmp_path, True, 4, 0, None, per_token)
    reporter.step(step_record(1))
    reporter.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["mfu"] == pytest.approx(expected, abs=1e-4)
    assert f"tok/s 9000  mfu {record['mfu']:.0%}  mem " in capsys.readouterr().out
