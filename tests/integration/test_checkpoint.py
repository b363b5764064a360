"""Checkpoints: exact resume after a signal, resharded resume, crash safety, export."""

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
import torch
from _support import TINY_20

from launcher.runtime.state import checkpoint as ckpt

pytestmark = pytest.mark.dist

STEPS = 20
BASE = TINY_20  # the training of the session's straight run (conftest.py's tiny_fsdp_20)


def _losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture
def straight(tiny_fsdp_20: Path) -> Path:
    """The uninterrupted 2-rank reference run, with checkpoints every 5 steps, all kept (the session's)."""
    return tiny_fsdp_20


def _start(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", *BASE, *extra, "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _ranks(proc: subprocess.Popen, world: int = 2) -> list[psutil.Process]:
    """The worker processes under `launcher run` (torchrun's children), once all of them exist."""
    seen: list[str] = []
    for _ in range(100):
        workers, seen = [], []
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:  # a short-lived helper process that is already gone
                continue
            seen.append(" ".join(cmdline))
            if "launcher.runtime" in cmdline and "launcher.agent" not in cmdline:
                workers.append(child)
        if len(workers) == world:
            return sorted(workers, key=lambda c: c.pid)
        time.sleep(0.1)
    raise AssertionError(f"expected {world} rank processes under pid {proc.pid}, saw: {seen}")


def _wait_for(condition, timeout: float = 240, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_signal_saves_and_resume_is_exact(straight: Path, tmp_path: Path, launcher, export) -> None:
    run = tmp_path / "run"
    proc = _start(run, "checkpoint.every=0")
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_losses(run)) >= 6, what="6 logged steps")
    ranks = _ranks(proc)
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)  # one rank only: all must stop at the same step
    assert proc.stdout is not None
    seen = ""
    while "launcher: received SIGUSR1" not in seen:  # rank 1 has it (a condition, not a fixed wait)
        line = proc.stdout.readline()
        assert line, f"launcher run ended before rank 1 took its signal:\n{seen[-3000:]}"
        seen += line
    ranks[0].send_signal(signal.SIGTERM)  # a second signal, to the other rank, changes nothing
    output, _ = proc.communicate(timeout=240)
    output = seen + output
    assert proc.returncode == 75, output
    stopped_at = int((run / "checkpoints" / "REQUEUE").read_text().strip().removeprefix("step-"))
    assert 6 <= stopped_at < STEPS
    assert ckpt.is_complete(ckpt.step_dir(run / "checkpoints", stopped_at))[0]

    done = launcher("run", "tiny-cpu.yaml", *BASE, "checkpoint.every=0", "--out", str(run))
    assert f"resuming from {ckpt.step_dir(run / 'checkpoints', stopped_at)} at step {stopped_at}" in done.stdout
    reference, resumed = _losses(straight), _losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(resumed[step] == reference[step] for step in resumed), "losses must be bit-identical"

    # Final weights are bit-identical too.
    for name in ("a", "b"):
        source = straight if name == "a" else run
        export(str(source), "--out", str(tmp_path / f"export-{name}"))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "export-a" / "model.safetensors"), load_file(tmp_path / "export-b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world", [1, 4])
def test_resume_at_another_world_size(straight: Path, tmp_path: Path, world: int, launcher) -> None:
    source = ckpt.step_dir(straight / "checkpoints", 10)
    run = tmp_path / f"w{world}"
    done = launcher(
        "run",
        "tiny-cpu.yaml",
        *BASE,
        f"cluster.gpus_per_node={world}",
        f"checkpoint.resume={source}",
        "checkpoint.every=0",
        "--out",
        str(run),
    )
    assert f"saved at world size 2, now {world}" in done.stdout
    reference, resumed = _losses(straight), _losses(run)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step


def test_rank_killed_mid_save_keeps_previous_checkpoint(tmp_path: Path, launcher) -> None:
    run = tmp_path / "run"
    # Rank 0 holds in the save (it leaves only by SIGKILL): 2 s of grace after rank 1's death, not 30.
    env = {"LAUNCHER_TEST_PAUSE_BEFORE_COMPLETE": "10", "LAUNCHER_TEST_FAILURE_GRACE_SECONDS": "2"}
    short = ["train.max_steps=12", "checkpoint.every=5"]  # step 10's save is not the last; the resume trains 7 steps
    proc = _start(run, *short, env=env)
    shard_written = ckpt.step_dir(run / "checkpoints", 10) / "model_optim" / ".metadata"
    _wait_for(shard_written.exists, what="the step-10 save to be under way")
    _ranks(proc)[1].kill()  # SIGKILL, mid-save
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75)
    assert "stopping the other ranks" in output, output[-3000:]
    assert "ranks still running after the grace period; killing them" in output, output[-3000:]
    assert not (ckpt.step_dir(run / "checkpoints", 10) / ckpt.COMPLETE).exists()
    assert os.readlink(run / "checkpoints" / "latest") == "step-00000005"

    done = launcher("run", "tiny-cpu.yaml", *BASE, *short, "--out", str(run))
    assert "skipping checkpoint" in done.stderr and "step-00000010: no COMPLETE marker" in done.stderr
    assert "at step 5" in done.stdout
    assert sorted(_losses(run)) == list(range(1, 13))


def test_truncated_or_unmarked_checkpoints_are_skipped(straight: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "checkpoints"
    for step in (15, 20):
        shutil.copytree(ckpt.step_dir(straight / "checkpoints", step), ckpt.step_dir(root, step))
    shard = next((ckpt.step_dir(root, 20) / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step-00000020.*truncated"):
        assert ckpt.find_resume(root, "auto") == ckpt.step_dir(root, 15)
    (ckpt.step_dir(root, 15) / ckpt.COMPLETE).unlink()
    # Folders but none complete: an error, not a silent restart from step 0.
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoint folder"):
        ckpt.find_resume(root, "auto")
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE"):
        ckpt.find_resume(root, str(ckpt.step_dir(root, 15)))


def test_retention_keeps_newest_complete(straight: Path) -> None:
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step-*"))
    assert kept == [f"step-{s:08d}" for s in (5, 10, 15, 20)]  # keep_last=10 kept all four
    assert os.readlink(straight / "checkpoints" / "latest") == "step-00000020"


def test_launcher_run_draws_the_plot_once_the_ranks_exit(straight: Path) -> None:
    """train.plot (on by default): `launcher run` itself draws loss.png after the ranks are done."""
    png = straight / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_mtime_ns >= (straight / "logs" / "state").stat().st_mtime_ns  # after the run was marked done
    assert "loss.png" not in (straight / "logs" / "launcher.log").read_text()  # no rank drew it


def test_export_loads_and_matches_checkpoint_logits(straight: Path, tmp_path: Path, export, capsys) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from launcher.cli import main

    out = tmp_path / "hf"
    export(str(straight), "--step", "15", "--out", str(out))
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    # Reference: torch's own DCP converter, loaded into the base architecture.
    dcp_to_torch_save(ckpt.step_dir(straight / "checkpoints", 15) / "model_optim", tmp_path / "ref.pt")
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    reference.load_state_dict(torch.load(tmp_path / "ref.pt", weights_only=False)["model"])
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["LAUNCHER_CACHE_DIR"]) / "tiny-llama-v2").eval()
    with torch.no_grad():
        assert not torch.allclose(exported(ids).logits, base(ids).logits, atol=1e-3)  # it did train
    capsys.readouterr()
    assert main(["export", str(straight), "--step", "7", "--out", str(tmp_path / "x")]) == 2  # `launcher export` exits with it
    assert capsys.readouterr().err.startswith("error: --step 7") and not (tmp_path / "x").exists()


def test_signal_during_startup_is_not_lost(tmp_path: Path) -> None:
    """USR1 while the model and data are still loading: the first step boundary saves and stops."""
    run = tmp_path / "run"
    proc = _start(run, "checkpoint.every=0")
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # each rank announces itself once its signal handlers are in place
        lines.append(line)
        if "".join(lines).count("launcher: rank ") == 2:
            break
    else:
        raise AssertionError(f"the run ended before both ranks started (exit {proc.wait()}):\n{''.join(lines)}")
    _ranks(proc)[0].send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, output
    assert (run / "checkpoints" / "REQUEUE").read_text().strip() == "step-00000001"


def test_async_save_writes_the_same_checkpoint(straight: Path, tmp_path: Path, launcher) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = tmp_path / "async"
    done = launcher(
        "run", "tiny-cpu.yaml", *BASE, "checkpoint.every=10", "checkpoint.async_save=true", "train.plot=false", "--out", str(run)
    )
    assert not (run / "loss.png").exists() and "launcher: plot" not in done.stdout  # train.plot: false
    for step in (10, 20):
        assert ckpt.is_complete(ckpt.step_dir(run / "checkpoints", step))[0]
        dcp_to_torch_save(ckpt.step_dir(run / "checkpoints", step) / "model_optim", tmp_path / "a.pt")
        dcp_to_torch_save(ckpt.step_dir(straight / "checkpoints", step) / "model_optim", tmp_path / "s.pt")
        a = torch.load(tmp_path / "a.pt", weights_only=False)["model"]
        s = torch.load(tmp_path / "s.pt", weights_only=False)["model"]
        assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a), step


def test_changed_settings_are_refused_unless_allowed(straight: Path, tmp_path: Path, launcher) -> None:
    source = ckpt.step_dir(straight / "checkpoints", 15)
    changed = ["train.global_batch_size=8", f"checkpoint.resume={source}"]
    refused = launcher("run", "tiny-cpu.yaml", *BASE, *changed, "--out", str(tmp_path / "a"), check=False)
    assert refused.returncode == 2
    assert "global_batch_size: 16 -> 8" in refused.stderr and "checkpoint.allow_mismatch=true" in refused.stderr
    allowed = launcher("run", "tiny-cpu.yaml", *BASE, *changed, "checkpoint.allow_mismatch=true", "--out", str(tmp_path / "b"))
    assert "warning: checkpoint.allow_mismatch: global_batch_size: 16 -> 8" in allowed.stderr
    assert "at step 15" in allowed.stdout


def test_starting_over_on_top_of_checkpoints_is_refused(straight: Path, launcher) -> None:
    before = sorted(p.name for p in (straight / "checkpoints").iterdir())
    done = launcher("run", "tiny-cpu.yaml", *BASE, "checkpoint.resume=never", "--out", str(straight), check=False)
    assert done.returncode == 2 and "holds an earlier run's checkpoints" in done.stderr
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == before
    assert sorted(_losses(straight)) == list(range(1, STEPS + 1))  # metrics untouched
