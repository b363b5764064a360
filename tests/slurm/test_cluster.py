"""The local SLURM cluster runs multi-node jobs, accepts every generated job.sbatch, and requeues on USR1."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launcher.config import load_config

# The shape controller's nodes (tests/slurm/conftest.py; conftest modules are not importable by name).
SHAPE_NODES, SHAPE_CPUS, SHAPE_GPUS = 64, 128, 8

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name at run time
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]

# Every shipped recipe that runs on GPUs, judged by a controller whose nodes have the shape they ask
# for (slurm_shape: 64 nodes x 128 CPUs, 2 TB, 8 GPUs), exactly as shipped but for the partition.
GPU_RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if load_config(p).cluster.accelerator == "cuda")
PARTITION = ["cluster.partition=local"]
# The 2-node cluster's nodes advertise this machine's 2 cores: the CPU recipe fits that.
FIT_OVERRIDES = ["cluster.cpus_per_task=2", "cluster.partition=local"]


def plan(recipe: str, out: Path, *overrides: str) -> Path:
    """`launcher plan` into out; return the job.sbatch path."""
    argv = [sys.executable, "-m", "launcher", "plan", str(ROOT / "recipes" / f"{recipe}.yaml"), *overrides, "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}{proc.stderr}"
    return out / "job.sbatch"


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_two_node_job_runs_on_both_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # torchrun's c10d rendezvous connects to the head node by name: it must resolve here and on the nodes.
    assert socket.gethostbyname("n1") and socket.gethostbyname("n2")
    out = tmp_path / "out.txt"
    script = write_script(
        tmp_path / "hosts.sh",
        f"""
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --time=2 --output={out}
        set -euo pipefail
        srun --nodes=2 --ntasks=2 bash -c \\
          'echo "task=$SLURM_PROCID node=$SLURMD_NODENAME host=$(hostname) head=$(getent hosts n1 | cut -d" " -f1)"'
        """,
    )
    job_id = slurm_cluster.submit(script)
    record = slurm_cluster.wait_done(job_id, timeout=60)
    assert record["JobState"] == "COMPLETED", slurm_cluster.log_of(record)
    assert record["ExitCode"] == "0:0"
    assert slurm_cluster.node_list(job_id) == ["n1", "n2"]

    tasks = [dict(f.split("=", 1) for f in line.split()) for line in out.read_text().splitlines() if line.startswith("task=")]
    assert sorted(t["node"] for t in tasks) == ["n1", "n2"], out.read_text()
    if slurm_cluster.mode == "netns":  # own UTS namespace per node; loopback nodes share this machine's hostname
        assert sorted(t["host"] for t in tasks) == ["n1", "n2"], out.read_text()
        # Each node's own /etc/hosts: its own name on a loopback address (as on many real nodes), n1's real
        # address, the one this machine knows, everywhere else (tests/slurm/test_rendezvous.py runs on that).
        assert {t["node"]: t["head"] for t in tasks} == {"n1": "127.0.1.1", "n2": socket.gethostbyname("n1")}, out.read_text()
    else:
        assert {t["head"] for t in tasks} == {socket.gethostbyname("n1")}, "the nodes and this machine disagree on n1's address"


def _assert_accepted(cluster: SlurmCluster, script: Path, gpus: bool) -> str:
    headers = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    for option in ("--partition=local", "--signal=B:USR1@", "--requeue", "--open-mode=append"):
        assert any(line.startswith(f"#SBATCH {option}") for line in headers), f"{option} missing from {script}"
    assert any(line.startswith("#SBATCH --gpus-per-node=") for line in headers) == gpus
    proc = cluster.test_only(script)
    assert proc.returncode == 0, f"sbatch --test-only rejected {script}:\n{proc.stderr}"
    assert "to start at" in proc.stderr and "in partition local" in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipe_sbatch_is_accepted_on_its_node_shape(slurm_shape: SlurmCluster, tmp_path: Path, recipe: str) -> None:
    assert len(GPU_RECIPES) >= 4
    _assert_accepted(slurm_shape, plan(recipe, tmp_path / recipe, *PARTITION), gpus=True)


def test_tiny_cpu_sbatch_is_accepted(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    _assert_accepted(slurm_cluster, plan("tiny-cpu", tmp_path / "tiny-cpu", *FIT_OVERRIDES), gpus=False)


def test_64_node_plan_is_accepted_by_a_64_node_controller(slurm_shape: SlurmCluster, tmp_path: Path) -> None:
    script = plan("llama3-70b-full-zero3-offload", tmp_path / "r64", *PARTITION, "cluster.nodes=64", "train.global_batch_size=512")
    verdict = _assert_accepted(slurm_shape, script, gpus=True)
    assert "using 8192 processors on nodes g[1-64]" in verdict, verdict


def test_test_only_rejects_what_does_not_fit(slurm_shape: SlurmCluster, tmp_path: Path) -> None:
    """Guards the tests above: --test-only really checks the request against the declared nodes."""
    script = plan("llama3-8b-full-fsdp", tmp_path / "run", *PARTITION)
    for too_much in (f"--gpus-per-node={SHAPE_GPUS + 1}", f"--cpus-per-task={SHAPE_CPUS + 1}", f"--nodes={SHAPE_NODES + 1}"):
        proc = slurm_shape.test_only(script, too_much)
        assert proc.returncode != 0, f"{too_much} was accepted:\n{proc.stderr}"


def test_generated_headers_put_logs_in_the_run_dir(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The quoted `--output="<run_dir>/logs/%x-%j.out"` headers, as sbatch reads them, with a trivial body."""
    run_dir = tmp_path / "run"
    generated = plan("tiny-cpu", run_dir, "cluster.partition=local")
    headers = [line for line in generated.read_text().splitlines() if line.startswith("#SBATCH ")]
    script = write_script(tmp_path / "headers-only.sh", "\n".join(["#!/bin/bash", *headers, 'echo "ran in $(pwd)"', ""]))
    job_id = slurm_cluster.submit(script)
    record = slurm_cluster.wait_done(job_id, timeout=60)
    assert record["JobState"] == "COMPLETED", slurm_cluster.log_of(record)
    assert record["StdOut"] == f"{run_dir}/logs/tiny-cpu-{job_id}.out"
    assert record["StdErr"] == f"{run_dir}/logs/tiny-cpu-{job_id}.err"
    assert "ran in" in (run_dir / "logs" / f"tiny-cpu-{job_id}.out").read_text()


def test_usr1_trap_requeues_and_the_job_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The preemption cycle without the training runtime: USR1 to the batch shell -> trap stops the
    child and requeues -> attempt 2 (SLURM_RESTART_COUNT=1) completes, appending to the same log."""
    out = tmp_path / "preempt.out"
    ready = tmp_path / "ready"
    script = write_script(
        tmp_path / "preempt.sh",
        f"""
        #!/bin/bash
        #SBATCH --nodes=1 --time=5 --requeue --open-mode=append --signal=B:USR1@60 --output={out}
        set -u
        restarts=${{SLURM_RESTART_COUNT:-0}}
        echo "attempt $((restarts + 1)) on $SLURMD_NODENAME"
        if ((restarts >= 1)); then echo "finished after requeue"; exit 0; fi
        on_usr1() {{
          echo "USR1: stopping the child and requeueing"
          kill "$child" 2>/dev/null
          wait "$child"
          scontrol requeue "$SLURM_JOB_ID"
          exit 0
        }}
        trap on_usr1 USR1
        sleep 300 &
        child=$!
        touch {ready}
        wait "$child"
        """,
    )
    job_id = slurm_cluster.submit(script)
    slurm_cluster.wait_for(job_id, lambda r: r["JobState"] == "RUNNING" and ready.exists(), timeout=30, what="RUNNING with the trap set")
    slurm_cluster.signal_batch(job_id, "USR1")
    # cred_expire=5 and sched_interval=1 in slurm.conf: the requeued attempt starts ~5-6 s after the requeue.
    record = slurm_cluster.wait_done(job_id, timeout=60)  # a requeued job passes PENDING, not a final state
    log = out.read_text()
    assert record["JobState"] == "COMPLETED", log
    assert slurm_cluster.restarts(job_id) == 1
    # One log across both attempts (--open-mode=append), in this order.
    positions = [log.find(text) for text in ("attempt 1 on", "USR1: stopping", "attempt 2 on", "finished after requeue")]
    assert -1 not in positions and positions == sorted(positions), log
