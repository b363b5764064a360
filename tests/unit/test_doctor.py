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


# --- `launcher doctor RECIPE --nodes N`: the job's script and the per-rank checks (launcher/doctor_job.py) ---


def test_bus_bandwidth_is_nccl_tests_busbw() -> None:
    """busbw = algbw x 2(n-1)/n: equal to algbw at 2 ranks, 1.5x at 4, 1.75x at 8; one rank moves nothing."""
    from launcher.doctor_job import bus_bandwidth

    algbw = 8 * 2**20 / 0.001  # 8 MiB in 1 ms
    assert bus_bandwidth(8 * 2**20, 0.001, 2) == pytest.approx(algbw)
    assert bus_bandwidth(8 * 2**20, 0.001, 4) == pytest.approx(1.5 * algbw)
    assert bus_bandwidth(8 * 2**20, 0.001, 8) == pytest.approx(1.75 * algbw)
    assert bus_bandwidth(8 * 2**20, 0.001, 1) == pytest.approx(algbw)


def _doctor_script(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str, *overrides: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    assert main(["doctor", recipe, "--dry-run", f"run.output_dir={run_dir}", *overrides]) == 0
    out = capsys.readouterr().out
    script = run_dir / "doctor" / "doctor.sbatch"
    assert out.startswith(script.read_text()) and out.endswith(f"dry run, would submit: sbatch --parsable {script}\n")
    return script.read_text(), script


def test_doctor_nodes_script_is_shellcheck_clean_and_asks_for_the_recipes_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import subprocess

    from test_scripts import SHELLCHECK

    scripts = []
    text, path = _doctor_script(tmp_path / "cpu", capsys, "tiny-cpu.yaml", "--nodes", "2")
    scripts.append(path)
    headers = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in headers and "#SBATCH --time=00:10:00" in headers and "#SBATCH --no-requeue" in headers
    assert "#SBATCH --cpus-per-task=2" in headers and not any("--signal" in h or "--gpus" in h for h in headers)
    assert f'#SBATCH --output="{tmp_path / "cpu" / "run" / "doctor"}/logs/%x-%j.out"' in headers
    assert '--rdzv_conf "is_host=${LAUNCHER_IS_HOST},join_timeout=120"' in text and "--nproc_per_node 2" in text
    assert f"-m launcher.doctor_job {path.parent / 'doctor.json'}" in text
    settings = json.loads((path.parent / "doctor.json").read_text())
    assert settings["accelerator"] == "cpu" and settings["nodes"] == 2 and settings["keep_last"] == 2
    assert settings["checkpoint_bytes"] > 0 and settings["run_dir"] == str(tmp_path / "cpu" / "run")

    gpu, path = _doctor_script(
        tmp_path / "gpu", capsys, "llama3-8b-full-fsdp.yaml", "--nodes", "4", "cluster.partition=gpu", "cluster.account=proj-1"
    )
    scripts.append(path)
    for header in ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--account=proj-1", "--time=00:10:00"):
        assert f"#SBATCH {header}" in gpu
    assert "export NCCL_DEBUG=WARN" in gpu and "--nproc_per_node 8" in gpu
    one, path = _doctor_script(tmp_path / "one", capsys, "tiny-cpu.yaml", "--nodes", "1")
    scripts.append(path)
    assert "--standalone --nnodes 1" in one and "--rdzv_endpoint" not in one
    done = subprocess.run([SHELLCHECK, "--severity=info", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_doctor_nodes_needs_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--nodes", "2"]) == 2
    assert "--nodes N needs a recipe" in capsys.readouterr().err


def test_node_checks_fail_with_the_fix(tmp_path: Path) -> None:
    """On this machine: a checkpoint larger than the disk, a plan over the host's memory, a marker
    that cannot be written; rank 0 names a node whose marker it does not see."""
    from launcher import doctor_job as job

    settings = {
        "run_dir": str(tmp_path),
        "accelerator": "cpu",
        "procs_per_node": 2,
        "network": "auto",
        "keep_last": 2,
        "checkpoint_bytes": 1e18,
        "host_bytes": 1e15,
        "mem": "",
        "gpu_memory_gib": 0.0,
        "model": str(tmp_path / "no-model"),
        "model_local_dir": "",
    }
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    checks = _by_name(job.node_checks(settings, blocker / "node-0"))
    assert checks["shared output"].status == "fail" and "make run.output_dir writable" in checks["shared output"].fix
    assert checks["disk"].status == "fail" and "3000000000.0 GB" in checks["disk"].found and "keep_last" in checks["disk"].fix
    assert checks["host memory"].status == "fail" and "raise cluster.mem" in checks["host memory"].fix
    assert (
        checks["shm"].status in ("ok", "warn") and checks["ulimit -l"].status == "ok" and "not needed on CPU" in checks["ulimit -l"].found
    )
    assert checks["model cache"].status == "fail" and "launcher prepare" in checks["model cache"].fix  # offline here
    markers = tmp_path / "doctor" / "nodes-7"
    markers.mkdir(parents=True)
    (markers / "node-0").write_text("n1\n")
    shared = job.check_shared(markers, ["n1", "n2"])
    assert shared.status == "fail" and shared.found.endswith("does not show the markers of n2")
    merged = job.merge(
        [("n1", [doc.Check("ok", "shm", "big")]), ("n2", [doc.Check("ok", "shm", "big")]), ("n3", [doc.Check("warn", "shm", "small", "f")])]
    )
    assert [c.line() for c in merged] == ["ok    shm: big [n1, n2]", "warn  shm: small [n3]; fix: f"]
    assert job.merge([("n1", [doc.Check("ok", "shm", "big")]), ("n2", [doc.Check("ok", "shm", "big")])])[0].found == "big [all 2 nodes]"


def test_allreduce_check_on_one_gloo_rank(tmp_path: Path) -> None:
    import torch.distributed as dist

    from launcher.doctor_job import check_allreduce

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        check = check_allreduce({"accelerator": "cpu", "nodes": 1}, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert check.status == "ok" and check.found.startswith("1 ranks on 1 node(s) over gloo, sum correct; bus bandwidth 64 KiB ")
    assert re.search(r"8 MiB \d+\.\d\d GB/s$", check.found)


def test_preemption_grace_against_one_save() -> None:
    """issue 26: the partition's GraceTime (scontrol show partition -o) against the plan's save time."""
    from launcher.doctor import preemption_grace

    shown = "PartitionName=gpu AllowGroups=ALL Default=YES PreemptMode=REQUEUE GraceTime={} State=UP"
    assert preemption_grace("gpu", shown.format(600), 120).line() == (
        "ok    preemption grace: partition gpu preempts (REQUEUE) with GraceTime=600 s, for a save of ~120 s"
    )
    short = preemption_grace("gpu", shown.format(60), 480)  # 988 GB at 0.5 GB/s per node on 4 nodes
    assert short.status == "warn" and "GraceTime=60, under the ~750 s a save of ~480 s needs" in short.line()
    assert "fix: ask the admins for a longer GraceTime, or save more often (checkpoint.every)" in short.line()
    assert preemption_grace("", "PartitionName=high PreemptMode=OFF", 480).line() == (
        "ok    preemption grace: partition high does not preempt (PreemptMode=OFF)"
    )
