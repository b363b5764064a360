"""A run directory run again (launcher/rerun.py): a finished run says where its results are and
starts nothing; a setting that changes training is refused; how long, how often and on how many
ranks may change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _support import launcher_cli, read_metrics

from launcher.config import load_config
from launcher.rerun import changed_settings, finished

pytestmark = pytest.mark.dist

TWO = ["train.max_steps=2", "optim.warmup_steps=1", "train.eval_exact_match=2", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """One tiny run trained to its train.max_steps (2), with its final evaluation."""
    run = tmp_path_factory.mktemp("rerun") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *TWO, "--out", str(run))
    return run


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "plan.json", "metrics.jsonl")}


def test_finished_run_says_done_and_starts_nothing(done_run: Path) -> None:
    before = _files(done_run)
    done = launcher_cli("run", "tiny-cpu.yaml", *TWO, "--out", str(done_run))
    assert f"launcher: {done_run} is done: trained to step 2 of 2 (train.max_steps); nothing to run" in done.stdout
    assert "process(es) on this machine" not in done.stdout and "[default0]" not in done.stdout
    final = done_run / "checkpoints" / "step-00000002"
    assert f"checkpoint  {final}" in done.stdout
    assert f"{done_run / 'metrics.jsonl'} (step 2: loss " in done.stdout and "val_loss" in done.stdout
    assert str(done_run / "eval.json") in done.stdout
    assert f"launcher export {done_run} --out {done_run / 'export'}" in done.stdout
    assert _files(done_run) == before  # no second evaluation appended, nothing rewritten
    assert len(read_metrics(done_run)[1]) == 1


def test_free_settings_are_allowed_on_a_finished_run(done_run: Path) -> None:
    # another world size (resharded on resume), cadences, retention: the training stays the same
    free = ["cluster.gpus_per_node=1", "train.log_every=1", "train.eval_every=1", "checkpoint.keep_last=5", "kernels.loss=plain"]
    done = launcher_cli("run", "tiny-cpu.yaml", *TWO, *free, "--out", str(done_run))
    assert "is done: trained to step 2 of 2" in done.stdout


def test_changed_setting_is_refused_line_by_line(done_run: Path) -> None:
    before = _files(done_run)
    refused = launcher_cli("run", "tiny-cpu.yaml", *TWO, "optim.lr=1e-3", "optim.weight_decay=0.1", "--out", str(done_run), check=False)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.splitlines()
    assert lines[0] == f"error: --out {done_run} holds a run trained with other settings; these would change its training:"
    assert lines[1:3] == ["  optim.lr: 0.003 -> 0.001", "  optim.weight_decay: 0.01 -> 0.1"]
    assert lines[3].startswith("fix: write the new run elsewhere (--out NEW_DIR), or branch from a checkpoint of this one (")
    assert f"checkpoint.resume={done_run / 'checkpoints' / 'step-00000002'} --out NEW_DIR" in lines[3]
    assert _files(done_run) == before
    # `launcher plan` would overwrite config.yaml and plan.json just the same
    assert launcher_cli("plan", "tiny-cpu.yaml", *TWO, "optim.lr=1e-3", "--out", str(done_run), check=False).returncode == 2
    assert _files(done_run) == before


def test_raised_max_steps_continues(done_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(done_run, run, symlinks=True)
    (run / "plan.json").write_text((run / "plan.json").read_text().replace(str(done_run), str(run)))
    done = launcher_cli("run", "tiny-cpu.yaml", *TWO, "train.max_steps=3", "--out", str(run))
    assert f"resuming from {run / 'checkpoints' / 'step-00000002'} at step 2" in done.stdout
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]


def test_what_may_change_is_listed_once() -> None:
    old = {
        "train": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "global_batch_size": 16, "max_steps": 2},
        "cluster": {"gpus_per_node": 2},
        "optim": {"lr": 0.003},
        "data": {"path": "a", "num_proc": 1},
    }
    new = {
        "train": {"micro_batch_size": 8, "gradient_accumulation_steps": 1, "global_batch_size": 16, "max_steps": 9},
        "cluster": {"gpus_per_node": 4},
        "optim": {"lr": 0.003},
        "data": {"path": "b", "num_proc": 4},
    }
    assert changed_settings(old, new) == [("data.path", "a", "b")]
    new["train"]["global_batch_size"] = 32
    assert ("train.global_batch_size", 16, 32) in changed_settings(old, new)
    new["optim"]["added_in_a_later_version"] = 1  # a key the old plan.json never had
    assert "optim.added_in_a_later_version" not in [key for key, _, _ in changed_settings(old, new)]


def test_early_stopped_run_is_done_until_patience_is_raised() -> None:
    stopping = ["train.max_steps=10", "train.early_stopping.metric=val_loss", "train.early_stopping.patience=2"]
    saved = {"step": 6, "early_stopping": {"waited": 2, "best_step": 2}}
    why = finished(load_config("tiny-cpu.yaml", stopping), saved, None)
    assert why == "stopped early at step 6: val_loss had not improved for 2 evaluation(s), best at step 2 (train.early_stopping.patience)"
    assert finished(load_config("tiny-cpu.yaml", [*stopping, "train.early_stopping.patience=3"]), saved, None) is None
    assert finished(load_config("tiny-cpu.yaml", ["train.max_steps=6", "optim.warmup_steps=1"]), {"step": 6}, None) is not None
    named = ["train.max_steps=6", "optim.warmup_steps=1", "checkpoint.resume=/x/step-00000006"]
    assert finished(load_config("tiny-cpu.yaml", named), {"step": 6}, None) is None  # a named checkpoint is run as asked
