"""What a run writes into its directory never goes through something planted there (issue 27): a
symbolic link at run.lock, data_report.json or plan.json is refused or replaced, never followed, so
the file it points to (another run's, or any file root can write) keeps its content; a FIFO at
run.lock is refused at once instead of blocking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

QUICK = ["train.max_steps=2", "optim.warmup_steps=1"]


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def test_a_linked_run_lock_is_refused_and_its_target_kept(tmp_path: Path, victim: Path, launcher) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    done = launcher("plan", "tiny-cpu.yaml", *QUICK, "--out", str(run), check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: {run / 'run.lock'}: is a symbolic link, not the run's lock file" in done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "precious\n" and not (run / "plan.json").exists()


def test_a_fifo_at_run_lock_is_refused_without_blocking(tmp_path: Path, launcher) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "run.lock")
    done = launcher("plan", "tiny-cpu.yaml", *QUICK, "--out", str(run), check=False, timeout=60)
    assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr


def test_linked_plan_files_and_data_report_are_replaced_not_followed(tmp_path: Path, victim: Path, launcher) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("plan.json", "config.yaml", "data_report.json"):
        (run / name).symlink_to(victim)
    # --force: a folder whose plan.json is not a run's is refused without it (test_run_dir.py)
    launcher("prepare", "tiny-cpu.yaml", *QUICK, "--out", str(run), "--force")
    assert victim.read_text() == "precious\n"
    for name in ("plan.json", "config.yaml", "data_report.json"):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert '"cache"' in (run / "data_report.json").read_text()


def test_fifos_where_a_run_reads_are_refused_without_blocking(tmp_path: Path, capsys) -> None:
    """A FIFO as plan.json or as a checkpoint's manifest.json blocked the reader forever (issue 27)."""
    import subprocess
    import sys

    from launcher.cli import main

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    os.mkfifo(run / "plan.json")
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2
    assert "plan.json: is not a regular file" in capsys.readouterr().err
    rank = subprocess.run(
        [sys.executable, "-m", "launcher.runtime", "--plan", str(run / "plan.json")], capture_output=True, text=True, timeout=60
    )
    assert rank.returncode == 2 and "is not a regular file" in rank.stderr and "Traceback" not in rank.stderr
    from launcher.plan.resume import CheckpointError, read_manifest

    os.mkfifo(run / "checkpoints" / "step-00000004" / "manifest.json")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_manifest(run / "checkpoints" / "step-00000004")


def test_status_prints_whatever_it_finds_and_never_raises(tmp_path: Path, capsys) -> None:
    """Damaged files in a run directory: `launcher status` shows what it can (issue 27: two tracebacks)."""
    from launcher.cli import main

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "plan.json").write_text('{"launcher_version": "0"}\n')  # missing every other field
    (run / "logs" / "state").write_bytes(b"fail\xffed 12 1\n")
    (run / "logs" / "job_id").write_bytes(b"\xfe\xfe")
    (run / "metrics.jsonl").write_text('[1, 2]\n{"step": "x", "loss": 1}\n{"step": 3, "loss": 2.5}\n{"step": 4, "loss": ')
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state: fail\ufffded (job 12, attempt 1" in out and "step 3  loss 2.5000" in out
    (run / "logs" / "state").unlink()
    os.mkfifo(run / "logs" / "state")  # would block a plain read
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state: not started" in out and "step: none logged yet" in out


def test_an_out_that_is_a_link_to_another_run_is_refused(tmp_path: Path, launcher) -> None:
    """`--out` pointing by a symbolic link at another run had this one rewrite that run's config.yaml
    and plan.json (issue 27): refused, naming where it points."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("mine\n")
    link = tmp_path / "link"
    link.symlink_to(other)
    done = launcher("plan", "tiny-cpu.yaml", *QUICK, "--out", str(link), check=False)
    assert done.returncode == 2 and f"error: --out: {link} is a symbolic link (to {other})" in done.stderr, done.stderr
    assert (other / "config.yaml").read_text() == "mine\n" and not (other / "plan.json").exists()


def test_fifos_as_weights_or_dcp_metadata_are_refused_without_blocking(tmp_path: Path) -> None:
    from launcher.plan.resume import CheckpointError
    from launcher.runtime.model.build import load_weights
    from launcher.runtime.model.files import ModelError
    from launcher.runtime.state.safe_state import SafeReader

    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.safetensors: is not a regular file"):
        load_weights(None, None, tmp_path, 0)  # type: ignore[arg-type]  # refused before the model is touched
    (tmp_path / "dcp").mkdir()
    os.mkfifo(tmp_path / "dcp" / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata is not a regular file"):
        SafeReader(str(tmp_path / "dcp")).read_metadata()


def test_exit_code_error_files_and_manifests_never_write_through_a_link(tmp_path: Path, victim: Path, capsys) -> None:
    """logs/exit_code was emptied through a planted link ("a+" then truncate); a rank's error record and
    a checkpoint's manifest were written to a predictable NAME.tmp, which a link could redirect."""
    from launcher.runtime.parallel.dist import write_error_file
    from launcher.runtime.state.checkpoint import _fsync_write, write_exit_code

    logs = tmp_path / "logs"
    (logs / "errors").mkdir(parents=True)
    (logs / "exit_code").symlink_to(victim)
    write_exit_code(logs, 3)
    assert "is a symbolic link" in capsys.readouterr().err
    (logs / "errors" / "rank-00000.tmp").symlink_to(victim)
    written = write_error_file(logs, 0, ValueError("boom"))
    (tmp_path / "MANIFEST.json.tmp").symlink_to(victim)
    _fsync_write(tmp_path / "MANIFEST.json", "{}\n")
    assert victim.read_text() == "precious\n"
    assert '"exception": "ValueError"' in written.read_text() and (tmp_path / "MANIFEST.json").read_text() == "{}\n"


def test_export_with_force_refuses_a_link_inside_out(tmp_path: Path, victim: Path) -> None:
    from launcher.runtime.state.export import ExportError, refuse_occupied

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    refuse_occupied(out, force=True)  # told to: a folder of ordinary files is written over
    (out / "config.json").symlink_to(victim)
    with pytest.raises(ExportError, match=r"holds config\.json, a symbolic link \(to .*victim.*\); remove it, or choose a new folder"):
        refuse_occupied(out, force=True)


def test_an_export_that_fails_leaves_no_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """A failed export left config.json and the tokenizer without weights (issue 25): it now writes
    beside --out and renames the folder into place only when complete."""
    from launcher.runtime.state import export as exporting

    def half(run_dir: Path, out: Path, step, merge) -> int:
        (out / "config.json").write_text("{}\n")
        raise exporting.ExportError("merged 8 of 14 LoRA pairs")

    monkeypatch.setattr(exporting, "export", half)
    assert exporting.export_run(str(tmp_path), str(tmp_path / "out")) == 2
    assert "merged 8 of 14" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(exporting, "export", lambda run_dir, out, step, merge: (out / "config.json").write_text("{}\n") and 0)
    (tmp_path / "empty").mkdir()
    assert exporting.export_run(str(tmp_path), str(tmp_path / "empty")) == 0
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["config.json"]
