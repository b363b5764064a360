"""`launcher doctor`: what it reports on this CPU machine (no CUDA, the dev extras installed)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

from launcher import doctor as doc
from launcher.cli import main
from launcher.config import load_config

LINE = re.compile(r"^(ok|warn|fail)\s+[\w -]+: \S")


def _by_name(checks: list[doc.Check]) -> dict[str, doc.Check]:
    return {c.name: c for c in checks}


def test_cpu_recipe_is_ready_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "tiny-cpu.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(LINE.match(line) for line in lines[:-1]), lines
    assert lines[-1].startswith("doctor: ready for tiny-cpu.yaml")
    checks = _by_name(doc.run_checks(load_config("tiny-cpu.yaml")))
    assert checks["torch"].status == "ok" and torch.__version__ in checks["torch"].found
    assert checks["cuda"].status == "ok" and "not needed" in checks["cuda"].found
    assert checks["processes"].found.startswith("2 CPU process(es) per node")
    assert checks["bitsandbytes"].status == "ok" and "NF4 round trip on cpu" in checks["bitsandbytes"].found
    assert checks["output"].status == "ok" and checks["rendezvous port"].status == "ok"
    # CUDA-only pieces are no concern of a CPU recipe: no flash-attn, Liger or NCCL lines at all.
    assert not {"flash-attn", "liger-kernel", "nccl"} & set(checks)
    assert "jobs use 20000 + SLURM_JOB_ID % 12000" in checks["rendezvous port"].found
    # tests/conftest.py runs everything offline; doctor says so and names the caches.
    assert checks["hub"].found.startswith("offline (HF_HUB_OFFLINE=1)") and ".cache/launcher" in checks["hub"].found


def test_gpu_recipe_fails_here_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "llama3-8b-full-fsdp.yaml"]) == 1
    out = capsys.readouterr().out
    assert "fail  cuda: torch has no CUDA support; fix: run on a GPU node with a CUDA build of torch, or set cluster.accelerator=cpu" in out
    assert "fail  gpus: 0 GPUs visible, the recipe runs 8 process(es) per node" in out
    assert out.splitlines()[-1] == "doctor: 3 check(s) failed for llama3-8b-full-fsdp.yaml: cuda, nccl, gpus"
    # Optional GPU kernels are absent here: a warning with the install line, not a failure.
    checks = _by_name(doc.run_checks(load_config("llama3-8b-full-fsdp.yaml")))
    assert checks["flash-attn"].status == "warn" and "pip install launcher[flash]" in checks["flash-attn"].line()


def test_taken_port_and_unwritable_output_fail(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = load_config("tiny-cpu.yaml", [f"cluster.rdzv_port={port}", f"run.output_dir={blocker / 'run'}"])
        checks = _by_name(doc.run_checks(cfg))
    assert checks["rendezvous port"].status == "fail" and f"{port} (cluster.rdzv_port) is taken" in checks["rendezvous port"].found
    assert "set cluster.rdzv_port" in checks["rendezvous port"].line()
    assert checks["output"].status == "fail" and "not writable" in checks["output"].found


def test_missing_extra_is_required_only_when_the_recipe_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = doc._version
    monkeypatch.setattr(doc, "_version", lambda dist: None if dist == "deepspeed" else real(dist))
    needed = _by_name(doc.run_checks(load_config("tiny-cpu-deepspeed.yaml")))["deepspeed"]
    assert needed.status == "fail" and needed.line().endswith("fix: pip install launcher[deepspeed]")
    assert _by_name(doc.run_checks(load_config("tiny-cpu.yaml")))["deepspeed"].status == "warn"


def test_the_port_a_job_really_uses_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside job 4242 the script takes 20000 + 4242 % 12000 = 24242, or the next free port above."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    check = _by_name(doc.run_checks(load_config("tiny-cpu.yaml")))["rendezvous port"]
    assert check.status == "ok" and check.found.startswith("24242 free for job 4242 (20000 + SLURM_JOB_ID % 12000)")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 24242))
        sock.listen()
        check = _by_name(doc.check_port(None))["rendezvous port"]
    assert check.found.startswith("24243 free for job 4242") and check.found.endswith("(24242 is in use)")


def test_the_hub_is_reported_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline by the environment, unreachable when the name does not resolve (never "online"), and
    reachable when the endpoint answers (a local socket stands in for it)."""
    assert _by_name(doc.check_offline())["hub"].found.startswith("offline (HF_HUB_OFFLINE=1)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub = _by_name(doc.check_offline())["hub"]
    assert hub.status == "warn" and hub.found.startswith("unreachable: hub.invalid does not resolve")
    assert "HF_HUB_OFFLINE=1" in hub.fix
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        hub = _by_name(doc.check_offline())["hub"]
    assert hub.status == "ok" and hub.found.startswith(f"reachable (127.0.0.1:{port} answered in")
