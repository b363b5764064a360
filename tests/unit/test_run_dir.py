"""What a run finds in its directory at run time (issue 27): `--out` naming a folder of someone else's
files is refused before anything is written there; files the run appends to (metrics.jsonl,
logs/launcher.log) are never opened through a link planted at their name; `launcher status`
prints a line, never a traceback, whatever the files hold; and a recipe's `key: null` is refused
where null is not a value, instead of silently meaning the default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import ConfigError, load_config

QUICK = ["train.max_steps=2", "optim.warmup_steps=1"]
TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# --- --out into a folder that is not a run directory ------------------------------------------


@pytest.mark.parametrize("command", ["plan", "prepare", "run", "submit"])
def test_out_into_a_folder_of_other_files_is_refused_writing_nothing(command: str, tmp_path: Path, launcher) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "notes.txt").write_text("notes\n")
    before = _tree(tmp_path)
    done = launcher(command, "tiny-cpu.yaml", *QUICK, "--out", str(mine), check=False, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: --out {mine}: is not empty and is not a launcher run directory (it holds config.yaml, notes.txt, "
        "and no plan.json `launcher plan` wrote); choose a new folder, or add --force to write the run into this one"
    ], done.stderr
    assert _tree(tmp_path) == before and sorted(os.listdir(mine)) == ["config.yaml", "notes.txt"]


def test_force_writes_into_it_and_a_run_directory_is_planned_again(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes\n")
    assert main(["plan", TINY, *QUICK, "--out", str(mine), "--force"]) == 0
    assert (mine / "plan.json").is_file() and (mine / "notes.txt").read_text() == "notes\n"
    assert main(["plan", TINY, *QUICK, "--out", str(mine)]) == 0, "a run directory (its plan.json) is planned again: resume"
    fresh = tmp_path / "fresh"
    assert main(["plan", TINY, *QUICK, "--out", str(fresh)]) == 0
    (fresh / "loss.png").write_bytes(b"")  # what a run leaves beside its plan
    assert main(["plan", TINY, *QUICK, "--out", str(fresh)]) == 0
    # What a folder may hold before its first plan: the lock and logs/ of a plan that stopped
    # before writing (a full disk), checkpoints brought in to resume from.
    early = tmp_path / "early"
    (early / "logs").mkdir(parents=True)
    (early / "checkpoints").mkdir()
    (early / "run.lock").write_text("")
    assert main(["plan", TINY, *QUICK, "--out", str(early)]) == 0
    capsys.readouterr()


def test_a_recipe_output_dir_of_other_files_is_refused_too(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / ".bashrc").write_text("alias ls=ls\n")
    assert main(["plan", TINY, *QUICK, f"run.output_dir={mine}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: run.output_dir {mine}: is not empty and is not a launcher run directory")
    assert sorted(os.listdir(mine)) == [".bashrc"]


@pytest.mark.parametrize("planted", ["not-json", "other-json", "link"])
def test_a_plan_json_that_is_not_a_runs_is_no_marker(planted: str, tmp_path: Path, victim: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["plan", TINY, *QUICK, "--out", str(run)]) == 0
    (run / "plan.json").unlink()
    if planted == "link":  # plan.json's content is a run's, but it is not this folder's file
        (tmp_path / "elsewhere.json").write_text(json.dumps({"launcher_version": "0", "run_dir": "", "config": {}, "topology": {}}))
        (run / "plan.json").symlink_to(tmp_path / "elsewhere.json")
    else:
        (run / "plan.json").write_text("{not json" if planted == "not-json" else '{"name": "my package"}')
    capsys.readouterr()
    assert main(["plan", TINY, *QUICK, "--out", str(run)]) == 2
    assert "is not a launcher run directory" in capsys.readouterr().err


def test_a_linked_logs_folder_is_refused(tmp_path: Path, capsys) -> None:
    """logs/ as a link would have the run's state, job id and launcher.log written wherever it points."""
    run = tmp_path / "run"
    assert main(["plan", TINY, *QUICK, "--out", str(run)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(run / "logs", tmp_path / "old-logs")
    (run / "logs").symlink_to(elsewhere)
    capsys.readouterr()
    assert main(["plan", TINY, *QUICK, "--out", str(run)]) == 2
    assert f"holds logs, a symbolic link (to {elsewhere})" in capsys.readouterr().err
    assert os.listdir(elsewhere) == []


# --- files appended to ------------------------------------------------------------------------


def test_open_append_refuses_links_fifos_and_folders_and_keeps_their_targets(tmp_path: Path, victim: Path) -> None:
    from launcher.runfiles import open_append

    link = tmp_path / "metrics.jsonl"
    link.symlink_to(victim)
    for truncate in (False, True):
        with pytest.raises(ConfigError, match=rf"error: {link}: is a symbolic link \(to {victim}\); remove it"):
            open_append(link, truncate=truncate)
    assert victim.read_text() == "precious\n"
    os.mkfifo(tmp_path / "fifo")  # no reader: without O_NONBLOCK the open would block forever
    (tmp_path / "folder").mkdir()
    for name in ("fifo", "folder"):
        with pytest.raises(ConfigError, match="is not a regular file"):
            open_append(tmp_path / name)
    plain = tmp_path / "plain.log"
    plain.write_text("one\n")
    with open_append(plain) as handle:
        handle.write("two\n")
    assert plain.read_text() == "one\ntwo\n"
    with open_append(plain, truncate=True) as handle:
        handle.write("three\n")
    assert plain.read_text() == "three\n"


@pytest.mark.parametrize("start_step", [0, 4])
def test_a_link_at_metrics_jsonl_is_refused_by_rank_0(start_step: int, tmp_path: Path, victim: Path) -> None:
    """A fresh run emptied the file a link at metrics.jsonl pointed to; a resumed one appended to it."""
    from launcher.plan.resume import CheckpointError
    from launcher.runtime.train.metrics import Reporter

    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: is a symbolic link"):
        Reporter(tmp_path, True, 10, start_step)
    assert victim.read_text() == "precious\n"


def test_a_link_at_launcher_log_is_refused_by_launcher_run(tmp_path: Path, victim: Path, launcher) -> None:
    run = tmp_path / "run"
    launcher("plan", "tiny-cpu.yaml", *QUICK, "--out", str(run))
    (run / "logs" / "launcher.log").symlink_to(victim)
    done = launcher("run", "tiny-cpu.yaml", *QUICK, "--out", str(run), check=False, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: {run / 'logs' / 'launcher.log'}: is a symbolic link (to {victim})" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "rank 0 of" not in done.stdout, "refused before a rank started"
    assert victim.read_text() == "precious\n"
    assert not (run / "logs" / "state").exists() and not (run / "data_report.json").exists(), "refused before anything ran"


# --- launcher status ------------------------------------------------------------------------


def test_status_never_raises_on_numbers_past_a_float_or_escape_sequences(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "plan.json").write_text('{"launcher_version": 7, "config": []}\n')  # wrong types
    (run / "logs" / "state").write_text("failed\x1b]0;title\x07 12 1 now\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "loss": 1.5, "lr": 10**400, "elapsed": 10**400})
        + "\n"
        + json.dumps({"step": 3, "loss": 10**400})  # past a float: not a loss
        + "\n"
        + json.dumps({"step": 2.5, "loss": 1.0})  # not a step
        + "\n"
    )
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state: failed\\x1b]0;title\\x07 (job 12, attempt 1, since now)" in out and "\x1b" not in out
    assert "step 2  loss 1.5000\n" in out


def test_status_with_its_files_replaced_by_folders(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "logs" / "state").mkdir(parents=True)
    (run / "logs" / "job_id").mkdir()
    (run / "metrics.jsonl").mkdir()
    (run / "checkpoints").write_text("not a folder\n")
    (run / "plan.json").write_text("{}")
    assert main(["status", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == ["state: not started", "step: none logged yet", "last complete checkpoint: none"]
    (run / "plan.json").unlink()
    (run / "plan.json").mkdir()
    assert main(["status", f"{run}\x1b[2J"]) == 2
    assert "\x1b" not in capsys.readouterr().err


# --- null in a recipe ---------------------------------------------------------------------


def test_null_max_steps_is_refused_not_read_as_the_default(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: tiny-cpu.yaml\ntrain:\n  max_steps: null\n")
    for args in ((recipe, []), (TINY, ["train.max_steps=null"]), (TINY, ["train.max_steps=~"])):
        with pytest.raises(ConfigError) as caught:
            load_config(*args)
        assert str(caught.value) == (
            "error: train.max_steps: is null, which would silently mean the default 1000 steps; remove the key, or give a number"
        )
    # Beside train.epochs, null clears the base recipe's max_steps: the epochs decide. An optional
    # key's null is its documented "unset" (derived from the others, or read from the model).
    assert load_config(TINY, ["train.max_steps=null", "train.epochs=2"]).train.epochs == 2
    cfg = load_config(TINY, ["train.micro_batch_size=null", "cluster.gpu_memory_gib=null", "model.hidden_size=null"])
    assert cfg.train.micro_batch_size and cfg.model.hidden_size


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.log_every=null", "error: train.log_every: is null, which this key cannot be; remove the key, or give a value of type int"),
        ("optim.lr=null", "error: optim.lr: is null, which this key cannot be; remove the key, or give a value of type float"),
        ("train=null", "error: train: is null (a section with nothing under it); remove the line, or indent its keys under it"),
    ],
)
def test_null_where_a_key_has_no_null_is_one_line(override: str, line: str, capsys) -> None:
    assert main(["validate", TINY, override]) == 2
    assert capsys.readouterr().err.strip() == line
