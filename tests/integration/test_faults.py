"""Faults on disk and between runs: corrupt checkpoints fall back, planted pickles never run, a
second run on a directory is refused, a full disk is one line. 2-rank CPU runs of the tiny recipe; the
checkpoints broken here are copies of the session's shared run (conftest.py's tiny_fsdp_20)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _support import TINY_FSDP_20

from launcher.plan.resume import MANIFEST, step_dir

pytestmark = pytest.mark.dist

STEPS = 20
BASE = TINY_FSDP_20  # the reference's own settings: a copy of it resumes as itself


def _lines(text: str) -> list[str]:
    """Output lines without torchrun's `[default0]:` rank prefixes."""
    return [re.sub(r"^\[default\d+\]:", "", line) for line in text.splitlines()]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


@pytest.fixture
def reference(tiny_fsdp_20: Path) -> Path:
    """One uninterrupted run with checkpoints at steps 5, 10, 15 and 20 (the session's: never written to)."""
    return tiny_fsdp_20


def _copy(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest, symlinks=True, ignore=shutil.ignore_patterns("run.lock"))
    return dest


def _corrupt(path: Path) -> None:
    """Same size, different bytes (a truncation check cannot see it)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _resume(run: Path, launcher) -> subprocess.CompletedProcess:
    return launcher("run", "tiny-cpu.yaml", *BASE, "--out", str(run), check=False)


def _assert_replayed_from(run: Path, reference: Path, step: int, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"at step {step}" in done.stdout, done.stdout
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl holds each step once"
    ref, got = _losses(reference), _losses(run)
    assert all(got[s] == ref[s] for s in range(step + 1, STEPS + 1)), "losses after the fallback are identical"


def test_corrupt_shard_falls_back_to_previous_checkpoint(reference: Path, tmp_path: Path, launcher) -> None:
    run = _copy(reference, tmp_path / "run")
    shard = sorted((step_dir(run / "checkpoints", 20) / "model_optim").glob("*.distcp"))[0]
    _corrupt(shard)
    done = _resume(run, launcher)
    warnings = [line for line in _lines(done.stderr) if "step-00000020" in line and line.startswith("warning:")]
    assert len(warnings) == 1 and "checksum" in warnings[0], done.stderr
    _assert_replayed_from(run, reference, 15, done)


def test_corrupt_metadata_without_checksums_falls_back(reference: Path, tmp_path: Path, launcher) -> None:
    """A checkpoint whose manifest has no checksums (an older one): the load itself fails, on every
    rank, and the run falls back."""
    run = _copy(reference, tmp_path / "run")
    folder = step_dir(run / "checkpoints", 20)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.pop("checksums")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _corrupt(folder / "model_optim" / ".metadata")
    done = _resume(run, launcher)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert any("step-00000020 cannot be loaded" in line and "falling back" in line for line in _lines(done.stderr)), done.stderr
    _assert_replayed_from(run, reference, 15, done)


def test_planted_pickles_never_run(reference: Path, tmp_path: Path, launcher) -> None:
    """Pickles whose unpickling would create a marker file, in every kind of checkpoint file, with
    the manifest rewritten to match (the attacker controls the whole copied directory)."""
    marker = tmp_path / "PWNED"

    class Plant:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Plant())
    run = _copy(reference, tmp_path / "run")
    planted = {
        20: "model_optim/.metadata",
        15: sorted(p.name for p in (step_dir(run / "checkpoints", 15) / "model_optim").glob("*.distcp"))[0],
        10: "rng/rank-00000.pt",
    }
    for step, name in planted.items():
        folder = step_dir(run / "checkpoints", step)
        target = folder / name if "/" in name else folder / "model_optim" / name
        target.write_bytes(payload)
        if step == 10:
            (folder / "rng" / "rank-00000.json").unlink()  # only the planted .pt is left for rank 0
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest.pop("checksums")
        manifest["files"] = {
            str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in ("COMPLETE", MANIFEST)
        }
        (folder / MANIFEST).write_text(json.dumps(manifest))
    done = _resume(run, launcher)
    assert not marker.exists(), "a planted pickle ran"
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 10" in done.stdout and "is not allowed in checkpoint metadata" in done.stderr, done.stderr[-3000:]


def test_no_complete_checkpoint_is_an_error_not_a_restart(reference: Path, tmp_path: Path, launcher) -> None:
    run = _copy(reference, tmp_path / "run")
    for complete in (run / "checkpoints").glob("step-*/COMPLETE"):
        complete.unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    done = _resume(run, launcher)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint.resume: auto, but none of the 4"), done.stderr
    assert "--out" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "nothing written"


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for_steps(first: subprocess.Popen, run: Path, steps: int) -> None:
    end = time.monotonic() + 240
    while _logged_steps(run) < steps:
        assert time.monotonic() < end and first.poll() is None, f"the first run did not reach step {steps}"
        time.sleep(0.2)


def test_second_run_on_a_directory_is_refused(tmp_path: Path, launcher) -> None:
    """The first run trains on through both refused starts; then SIGTERM stops it (it had steps to
    spare: a run that ended by itself would have given up its lock before the checks were done)."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", *BASE, "train.max_steps=2000", "train.plot=false", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_steps(first, run, 2)
        before = {p: p.read_bytes() for p in run.glob("*") if p.is_file() and p.name != "metrics.jsonl"}
        second = launcher("run", "tiny-cpu.yaml", *BASE, "--out", str(run), check=False, timeout=60)
        assert second.returncode == 2
        line = second.stderr.strip()
        assert line.startswith(f"error: {run}: another run owns this directory (pid {first.pid} on {socket.gethostname()})"), line
        assert {p: p.read_bytes() for p in run.glob("*") if p.is_file() and p.name != "metrics.jsonl"} == before
        # Started as `bash launch.sh` (as under SLURM: no `launcher run` above it), rank 0 takes the lock itself.
        direct = subprocess.run(["bash", str(run / "launch.sh")], capture_output=True, text=True, timeout=180)
        assert direct.returncode != 0 and "another run owns this directory" in direct.stderr + direct.stdout
        _wait_for_steps(first, run, _logged_steps(run) + 1)  # still training after both
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)  # saves at the next step boundary and exits 75
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 75, output[-3000:]
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3, "the first run's metrics are intact"


def _tmpfs(path: Path, size: str, options: str = "") -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the ENOSPC test needs one")


def test_full_disk_during_save_is_one_line_and_keeps_last_checkpoint(tmp_path: Path, launcher) -> None:
    mount = tmp_path / "small"
    _tmpfs(mount, "20m")  # one checkpoint of the tiny model is about 13 MB: the second save (step 10) fails
    try:
        run = mount / "run"
        done = launcher("run", "tiny-cpu.yaml", *BASE, "--out", str(run), check=False)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        errors = [line for line in _lines(done.stderr) if line.startswith("error: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "step-00000005" in errors[0], done.stderr[-3000:]
        assert (run / "logs" / "exit_code").read_text().strip() == "2"
        assert os.readlink(run / "checkpoints" / "latest") == "step-00000005"
        from launcher.plan.resume import is_complete

        assert is_complete(step_dir(run / "checkpoints", 5), verify=True)[0]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`launcher ARGV`'s exit code and stderr, from the main() `python -m launcher` exits with (an
    exception main() lets through fails the test, as its traceback would have shown)."""
    from launcher.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def test_full_disk_during_plan_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mount = tmp_path / "tiny"
    _tmpfs(mount, "8k")
    try:
        code, stderr = _cli(["plan", "tiny-cpu.yaml", "--out", str(mount / "run")], capsys)
        assert code == 2 and "Traceback" not in stderr
        assert stderr.startswith(f"error: {mount / 'run'}") and "No space left on device" in stderr, stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_read_only_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mount = tmp_path / "ro"
    _tmpfs(mount, "1m", ",ro")
    try:
        stderr = []
        for argv in (["plan", "tiny-cpu.yaml", "--out", str(mount / "run")], ["export", str(mount), "--out", str(mount / "e")]):
            code, err = _cli(argv, capsys)
            assert code == 2 and "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
            stderr.append(err)
        assert "Read-only file system" in stderr[0]  # the plan's one line
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_export_verifies_checksums_like_resume(reference: Path, tmp_path: Path, export) -> None:
    """A same-size corrupted shard (sizes match, the CRC-32 does not): export passes over that
    checkpoint to the one before, saying so, and refuses it when --step names it (issue 27)."""
    from launcher.cli import main

    run = _copy(reference, tmp_path / "run")
    _corrupt(sorted((step_dir(run / "checkpoints", 20) / "model_optim").glob("*.distcp"))[0])
    with pytest.raises(AssertionError, match=r"step-00000020 cannot be exported: model_optim/.* does not match its checksum"):
        export(str(run), "--step", "20", "--out", str(tmp_path / "named"))
    assert not (tmp_path / "named").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "newest")]) == 0
    import safetensors.torch

    exported = safetensors.torch.load_file(str(tmp_path / "newest" / "model.safetensors"))
    step15 = tmp_path / "step15"
    export(str(run), "--step", "15", "--out", str(step15))
    assert all(torch.equal(t, safetensors.torch.load_file(str(step15 / "model.safetensors"))[k]) for k, t in exported.items())


def test_export_refuses_a_manifest_naming_files_outside_the_checkpoint(reference: Path, tmp_path: Path) -> None:
    from launcher.cli import main

    run = _copy(reference, tmp_path / "run")
    folder = step_dir(run / "checkpoints", 20)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["/etc/hostname"] = Path("/etc/hostname").stat().st_size
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert main(["export", str(run), "--step", "20", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()


def test_export_into_a_folder_holding_files_needs_force(reference: Path, tmp_path: Path, export, capsys) -> None:
    from launcher.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    assert main(["export", str(reference), "--out", str(out)]) == 2
    assert f"error: --out {out}: is not empty (it holds config.json); choose a new folder, or add --force" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": true}\n'
    export(str(reference), "--force", "--out", str(out))
    assert json.loads((out / "config.json").read_text()).get("mine") is None
