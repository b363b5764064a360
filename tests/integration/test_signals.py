"""Signals to `launcher run` itself, as a terminal or a scheduler sends them: SIGINT (Ctrl-C, to the
process group), SIGTERM and SIGUSR1 each save at the next step boundary, exit 75 with no process left
behind, and the resumed run is bit-identical to an uninterrupted one. A second Ctrl-C stops at once.
A rank that raises ends the run with one line naming it; `launcher status` reports each outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.runtime.state import checkpoint as ckpt

pytestmark = pytest.mark.dist

STEPS = 10
BASE = [
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.global_batch_size=8",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "checkpoint.every=0",  # the default: without the signal save, an interrupted run keeps nothing
]


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _start(run: Path, env: dict[str, str] | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    """`launcher run` in its own process group, as a shell starts a foreground job."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", *BASE, *(extra or []), "train.plot=false", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def _wait_for_steps(proc: subprocess.Popen, run: Path, steps: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while len(_losses(run)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"launcher run ended ({proc.returncode}) before {steps} steps:\n{proc.communicate()[0]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {steps} logged steps within {timeout:.0f} s")
        time.sleep(0.1)


def _leftovers(run: Path) -> list[str]:
    """Processes of this run still alive (torchrun and the ranks carry RUN/plan.json on their command line)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(run) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def _status(run: Path) -> str:
    from _support import launcher_cli

    return launcher_cli("status", str(run)).stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("reference") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *BASE, "--out", str(run))
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=lambda s: signal.Signals(s).name)
def test_signal_to_launcher_run_saves_and_resumes_exactly(reference: Path, tmp_path: Path, signum: int, launcher) -> None:
    """SIGUSR1's run saves asynchronously every 2 steps, each save held in flight until waited for: the
    save in flight when the signal comes counts as the signal save (no second one)."""
    run = tmp_path / "run"
    usr1 = signum == signal.SIGUSR1
    extra = ["checkpoint.every=2", "checkpoint.async_save=true"] if usr1 else []
    proc = _start(run, {"LAUNCHER_TEST_HOLD_ASYNC_SAVE": "1"} if usr1 else None, extra)
    _wait_for_steps(proc, run, 3)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground process group
    else:
        proc.send_signal(signum)  # a scheduler or `kill` signals the process it started
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, output
    assert _leftovers(run) == [], output
    stopped_at = int((run / "checkpoints" / "REQUEUE").read_text().strip().removeprefix("step-"))
    if usr1:
        assert stopped_at % 2 == 0 and 2 <= stopped_at < STEPS, output
        assert f"exiting with 75 (the save in flight when the signal came counts; run again to resume at step-{stopped_at:08d})" in output
    else:
        assert 3 <= stopped_at < STEPS, output
    assert ckpt.is_complete(ckpt.step_dir(run / "checkpoints", stopped_at))[0]
    name = signal.Signals(signum).name
    assert f"launcher: received {name}; saving at the next step boundary" in output
    assert "Traceback" not in output, output  # torchrun's SignalException traceback goes to the log only
    log = (run / "logs" / "launcher.log").read_text()
    assert "[default0]:launcher: rank 0 of 2" in log and "[default1]:launcher: rank 1 of 2" in log
    assert _status(run).splitlines()[0].startswith("state: preempted (job local, attempt 1")

    done = launcher("run", "tiny-cpu.yaml", *BASE, *extra, "--out", str(run))
    assert f"resuming from {ckpt.step_dir(run / 'checkpoints', stopped_at)} at step {stopped_at}" in done.stdout
    expected, resumed = _losses(reference), _losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in resumed] == [expected[s] for s in resumed], "losses must be bit-identical"
    status = _status(run)
    assert "state: done" in status and f"last complete checkpoint: step-{STEPS:08d}" in status, status


def test_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_steps(proc, run, 2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.stdout is not None
    seen = ""
    while "(Ctrl-C again to stop at once)" not in seen:  # the first one handled: then the second, well before the save ends
        line = proc.stdout.readline()
        assert line, f"launcher run ended before it handled the first Ctrl-C:\n{seen}"
        seen += line
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    output = seen + output
    assert time.monotonic() - t0 < 10, output
    assert proc.returncode == 130, output
    assert "second Ctrl-C: stopping every process of the run now" in output
    assert _leftovers(run) == [], output


def test_a_rank_that_raises_ends_the_run_with_one_line(tmp_path: Path, launcher) -> None:
    run = tmp_path / "run"
    done = launcher("run", "tiny-cpu.yaml", *BASE, "--out", str(run), env={"LAUNCHER_TEST_RAISE_AT_STEP": "2"}, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: failed: rank 1 on "), done.stderr[-3000:]
    assert "RuntimeError: LAUNCHER_TEST_RAISE_AT_STEP=2: test failure on rank 1 at " in last and "dist.py:" in last, last
    assert _leftovers(run) == []
    log = (run / "logs" / "launcher.log").read_text()
    raised = [line for line in log.splitlines() if "RuntimeError: LAUNCHER_TEST_RAISE_AT_STEP=2" in line]
    assert raised and all(line.startswith("[default1]:") for line in raised), log[-3000:]
    status = _status(run)
    assert status.splitlines()[0].startswith("state: failed (job local, attempt 1") and last.removeprefix("launcher: ") in status, status


def test_a_closed_terminal_saves_and_leaves_no_rank(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed) reaches `launcher run` only, the ranks being in their own sessions:
    it is passed on like SIGTERM, so they save and stop rather than train on under init (issue 24)."""
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGHUP)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, output
    assert "launcher: received SIGHUP; saving at the next step boundary" in output
    stopped_at = int((run / "checkpoints" / "REQUEUE").read_text().strip().removeprefix("step-"))
    assert ckpt.is_complete(ckpt.step_dir(run / "checkpoints", stopped_at))[0]
    assert _leftovers(run) == [], output


def test_a_killed_launcher_run_takes_its_ranks_with_it(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives `launcher run` no chance to pass anything on: each rank has
    asked the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so none is left running. The
    ranks log rarely here, as a real job's do: a print into the dead pipe would have ended them anyway."""
    run = tmp_path / "run"
    proc = _start(run, extra=["train.max_steps=20000", "train.log_every=10000"])
    assert proc.stdout is not None
    seen = ""
    while "step 1/20000" not in seen:  # rank 0's first step: both ranks are past start-up, training, silent
        line = proc.stdout.readline()
        assert line, f"launcher run ended before its first step:\n{seen}"
        seen += line
    assert len([line for line in _leftovers(run) if "launcher.runtime" in line]) == 2
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while _leftovers(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(run) == []
