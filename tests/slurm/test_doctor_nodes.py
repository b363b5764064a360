"""`launcher doctor RECIPE --nodes 2` on the local 2-node cluster: the job runs the checks on every rank
(gloo on CPU), and the command prints its report and exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name at run time
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


def test_doctor_on_two_nodes_reports_allreduce_and_shared_dir(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # cpus_per_task=2 fills a node (the nodes advertise this machine's 2 cores): 2 ranks per node, 4 in all.
    argv = [sys.executable, "-m", "launcher", "doctor", "tiny-cpu.yaml", "--nodes", "2", "--wait", "90"]
    argv += [f"run.output_dir={run_dir}", "cluster.partition=local", "cluster.cpus_per_task=2"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT, env=dict(os.environ))
    seconds = time.monotonic() - t0
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{proc.stderr}"
    job_id = int(re.search(r"^doctor: job (\d+) on 2 node\(s\)", out, re.M).group(1))  # type: ignore[union-attr]
    record = slurm_cluster.job(job_id)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert slurm_cluster.node_list(job_id) == ["n1", "n2"]

    # Every rank of both nodes joined the all-reduce, timed with a bus bandwidth per size.
    allreduce = re.search(r"^ok    all-reduce: 4 ranks on 2 node\(s\) over gloo, sum correct; bus bandwidth (.*)$", out, re.M)
    assert allreduce, out
    figures = re.findall(r"(\d+ [KM]iB) (\d+\.\d+) GB/s", allreduce.group(1))
    assert [size for size, _ in figures] == ["64 KiB", "1 MiB", "8 MiB"] and all(float(bw) > 0 for _, bw in figures), out
    # Each node wrote its marker in the output dir and rank 0 (on n1) saw both.
    assert re.search(
        rf"^ok    shared output: {re.escape(str(run_dir))} is shared: the marker of each of 2 node\(s\) seen from n1$", out, re.M
    ), out
    assert sorted(p.name for p in (run_dir / "doctor" / f"nodes-{job_id}").iterdir()) == ["node-0", "node-1"]
    # The login side: the partition's preemption GraceTime (60 s here) against the plan's save.
    assert re.search(
        r"^ok    preemption grace: partition local preempts \(REQUEUE\) with GraceTime=60 s, for a save of ~0 s$", out, re.M
    ), out
    for name in ("disk", "shm", "ulimit -l", "host memory", "versions", "model cache"):
        assert re.search(rf"^(ok|warn) +{name}: .*\[(all 2 nodes|n1|n2)\]$", out, re.M), (name, out)
    assert out.splitlines()[-1].startswith("doctor: ready for tiny-cpu.yaml on 2 node(s) ("), out
    assert (run_dir / "doctor" / f"report-{job_id}.txt").read_text().splitlines()[-1] == out.splitlines()[-1]
    print(f"\nlauncher doctor --nodes 2: {seconds:.1f} s from submit to report")


def test_doctor_on_two_nodes_fails_a_check_with_its_fix(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """cluster.mem=2G under the plan's 3.2 GiB of host memory per node (one rank each): the ranks' check
    fails on both nodes with the fix, the job ends FAILED and the command exits 1 (the plan would refuse it too)."""
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "doctor",
        "tiny-cpu.yaml",
        "--nodes",
        "2",
        "--wait",
        "90",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    argv += ["cluster.partition=local", "cluster.cpus_per_task=2", "cluster.gpus_per_node=1", "cluster.mem=2G"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT, env=dict(os.environ))
    out = proc.stdout
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{out}\n{proc.stderr}"
    job_id = int(re.search(r"^doctor: job (\d+) on 2 node\(s\)", out, re.M).group(1))  # type: ignore[union-attr]
    assert slurm_cluster.state(job_id) == "FAILED"
    assert re.search(
        r"^fail  host memory: .* 2\.0 GiB allocated \(cluster\.mem 2G\); the plan needs .* \[all 2 nodes\]; fix: raise cluster\.mem",
        out,
        re.M,
    ), out
    assert re.search(r"^ok    all-reduce: 2 ranks on 2 node\(s\) over gloo", out, re.M), out
    assert out.splitlines()[-1] == "doctor: 1 check(s) failed for tiny-cpu.yaml on 2 node(s): host memory", out
