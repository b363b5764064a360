"""A run directory run again (launcher/rerun.py): a finished run says where its results are and
starts nothing; a setting that changes training is refused; how long, how often and on how many
ranks may change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _support import launcher_cli, read_metrics

from launcher.rerun import changed_settings

pytestmark = pytest.mark.dist

TWO = ["train.max_steps=2", "optim.warmup_steps=1", "train.eval_exact_match=2", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One tiny run trained to its train.max_steps (2), with its final evaluation."""
    run = tmp_path_factory.mktemp("rerun") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *TWO, "--out", str(run))
    return run


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "plan.json", "metrics.jsonl")}


def test_finished_run_says_done_and_starts_nothing(finished: Path) -> None:
    before = _files(finished)
    done = launcher_cli("run", "tiny-cpu.yaml", *TWO, "--out", str(finished))
    assert f"launcher: {finished} is done: trained to step 2 of 2 (train.max_steps); nothing to run" in done.stdout
    assert "process(es) on this machine" not in done.stdout and "[default0]" not in done.stdout
    final = finished / "checkpoints" / "step-00000002"
    assert f"checkpoint  {final}" in done.stdout
    assert f"{finished / 'metrics.jsonl'} (step 2: loss " in done.stdout and "val_loss" in done.stdout
    assert str(finished / "eval.json") in done.stdout
    assert f"launcher export {finished} --out {finished / 'export'}" in done.stdout
    assert _files(finished) == before  # no second evaluation appended, nothing rewritten
    assert len(read_metrics(finished)[1]) == 1


def test_free_settings_are_allowed_on_a_finished_run(finished: Path) -> None:
    # another world size (resharded on resume), cadences, retention: the training stays the same
    free = ["cluster.gpus_per_node=1", "train.log_every=1", "train.eval_every=1", "checkpoint.keep_last=5", "kernels.loss=plain"]
    done = launcher_cli("run", "tiny-cpu.yaml", *TWO, *free, "--out", str(finished))
    assert "is done: trained to step 2 of 2" in done.stdout


def test_changed_setting_is_refused_line_by_line(finished: Path) -> None:
    before = _files(finished)
    refused = launcher_cli("run", "tiny-cpu.yaml", *TWO, "optim.lr=1e-3", "optim.weight_decay=0.1", "--out", str(finished), check=False)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.splitlines()
    assert lines[0] == f"error: --out {finished} holds a run trained with other settings; these would change its training:"
    assert lines[1:3] == ["  optim.lr: 0.003 -> 0.001", "  optim.weight_decay: 0.01 -> 0.1"]
    assert lines[3].startswith("fix: write the new run elsewhere (--out NEW_DIR), or branch from a checkpoint of this one (")
    assert f"checkpoint.resume={finished / 'checkpoints' / 'step-00000002'} --out NEW_DIR" in lines[3]
    assert _files(finished) == before
    # `launcher plan` would overwrite config.yaml and plan.json just the same
    assert launcher_cli("plan", "tiny-cpu.yaml", *TWO, "optim.lr=1e-3", "--out", str(finished), check=False).returncode == 2
    assert _files(finished) == before


def test_raised_max_steps_continues(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    (run / "plan.json").write_text((run / "plan.json").read_text().replace(str(finished), str(run)))
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
