"""A real, local SLURM cluster (slurm/cluster.sh: munged, slurmctld, nodes n1 and n2) for the tests here.

The `slurm_cluster` fixture starts it once per session and stops it at the end; a cluster that was
already running (`slurm/cluster.sh start` by hand, for a fast edit-test loop) is reused and left running,
except one an interrupted test session left behind, which is stopped this time.
Without root or the Debian packages the tests skip, unless LAUNCHER_REQUIRE_SLURM=1 (CI) makes that a failure.
The fixture returns a `SlurmCluster` whose methods submit jobs and read their state from
`scontrol show job -o` (there is no slurmdbd, so no sacct).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
DEFAULT_STATE_DIR = "/tmp/launcher-slurm"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
# States a job never leaves by itself (PREEMPTED and NODE_FAIL jobs may requeue, but not here).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` (one `scontrol -o` record) -> dict. Values never contain spaces with -o
    except a few free-text fields (Comment, Command with arguments); those keep their first word only."""
    fields: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    conf: Path
    mode: str  # "netns" (own IP and hostname per node) or "loopback" (both nodes on 127.0.0.1)
    partition: str = "local"
    high_partition: str = "high"  # a higher PriorityTier over the same nodes: its jobs preempt the default partition's
    nodes: tuple[str, ...] = ("n1", "n2")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster; errors carry its stderr."""
        env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def submit(self, script: Path | str, *sbatch_args: str) -> int:
        """sbatch the script; return the job id."""
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def test_only(self, script: Path | str, *sbatch_args: str) -> subprocess.CompletedProcess[str]:
        """`sbatch --test-only`: nothing is queued; the verdict is on stderr, the exit code says whether it fits."""
        return self.run("sbatch", "--test-only", *sbatch_args, str(script), check=False)

    def job(self, job_id: int) -> dict[str, str]:
        """The job's `scontrol show job -o` record (kept MinJobAge=3600 s after it ends)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        return parse_scontrol_record(out.splitlines()[0])

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def restarts(self, job_id: int) -> int:
        """How many times the job was requeued (SLURM_RESTART_COUNT of its next attempt)."""
        return int(self.job(job_id)["Restarts"])

    def node_list(self, job_id: int) -> list[str]:
        """The job's nodes, expanded (`n[1-2]` -> ["n1", "n2"])."""
        nodelist = self.job(job_id)["NodeList"]
        if nodelist in ("", "(null)"):
            return []
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def signal_batch(self, job_id: int, signal: str = "USR1") -> None:
        """Send a signal to the batch shell only, as `--signal=B:SIG@N` does before the time limit."""
        self.run("scancel", "--batch", f"--signal={signal}", str(job_id))

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    def wait_for(
        self, job_id: int, predicate: Callable[[dict[str, str]], bool], timeout: float = 60, what: str = "the expected state"
    ) -> dict[str, str]:
        """Poll the job until predicate(record) holds; fail with the record and the job's log otherwise."""
        deadline = time.monotonic() + timeout
        record = self.job(job_id)
        while not predicate(record):
            if time.monotonic() > deadline:
                self.cancel(job_id)
                pytest.fail(f"job {job_id} did not reach {what} within {timeout:.0f} s; last record:\n{record}\n{self.log_of(record)}")
            time.sleep(0.25)
            record = self.job(job_id)
        return record

    def wait_state(self, job_id: int, states: Sequence[str] | str, timeout: float = 60) -> dict[str, str]:
        wanted = {states} if isinstance(states, str) else set(states)
        return self.wait_for(job_id, lambda r: r["JobState"] in wanted, timeout, f"state {'/'.join(sorted(wanted))}")

    def wait_done(self, job_id: int, timeout: float = 60) -> dict[str, str]:
        """Wait until the job has ended for good (a requeued job goes back to PENDING, which is not the end)."""
        return self.wait_for(job_id, lambda r: r["JobState"] in FINAL_STATES, timeout, "a final state")

    @staticmethod
    def log_of(record: dict[str, str], lines: int = 40) -> str:
        """Tail of the job's stdout/stderr files, for failure messages."""
        parts = []
        for key in ("StdOut", "StdErr"):
            path = Path(record.get(key, ""))
            if path.is_file() and (key == "StdOut" or record.get("StdErr") != record.get("StdOut")):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [b for b in BINARIES if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (network namespaces, /etc/hosts, munged as user munge)"
    return None


def _cluster_sh(command: str, state_dir: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), command, state_dir],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SBIN_PATH, "LAUNCHER_SLURM_OWNER": "pytest", **(env or {})},
    )


# A controller that declares GPU nodes of the recipes' shape (2 TB, 128 CPUs, 8 GPUs) and 64 of them,
# with no slurmd: `sbatch --test-only` judges the shipped scripts as a real GPU cluster would.
SHAPE_NODES, SHAPE_CPUS, SHAPE_MEM_MB, SHAPE_GPUS = 64, 128, 2_000_000, 8
SHAPE_PORT = "16917"  # its own controller port, beside the 2-node cluster's


@pytest.fixture(scope="session")
def slurm_shape() -> Iterator[SlurmCluster]:
    reason = _missing()
    if reason:
        if os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
            pytest.fail(f"LAUNCHER_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    state_dir = (os.environ.get("LAUNCHER_SLURM_DIR") or DEFAULT_STATE_DIR) + "-shape"
    env = {"LAUNCHER_SLURM_PORT": SHAPE_PORT, "LAUNCHER_SLURM_SHAPE": f"{SHAPE_NODES} {SHAPE_CPUS} {SHAPE_MEM_MB} {SHAPE_GPUS}"}
    proc = _cluster_sh("shape", state_dir, env=env)
    if proc.returncode != 0:
        pytest.fail(f"slurm/cluster.sh shape failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    nodes = tuple(f"g{i}" for i in range(1, SHAPE_NODES + 1))
    try:
        yield SlurmCluster(state_dir=Path(state_dir), conf=Path(state_dir) / "slurm.conf", mode="shape", nodes=nodes)
    finally:
        _cluster_sh("stop", state_dir, env=env)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _missing()
    if reason:
        if os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
            pytest.fail(f"LAUNCHER_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    state_dir = os.environ.get("LAUNCHER_SLURM_DIR") or DEFAULT_STATE_DIR
    running = _cluster_sh("status", state_dir).returncode == 0
    owner = Path(state_dir, "owner").read_text().strip() if Path(state_dir, "owner").is_file() else ""
    # Ours to stop unless started by hand; one left running by an interrupted session is adopted.
    started_here = not running or owner == "pytest"
    if not running:
        t0 = time.monotonic()
        proc = _cluster_sh("start", state_dir)
        if proc.returncode != 0:
            pytest.fail(f"slurm/cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        print(f"\nslurm cluster started in {time.monotonic() - t0:.2f} s")
    mode = (Path(state_dir) / "mode").read_text().strip()
    cluster = SlurmCluster(state_dir=Path(state_dir), conf=Path(state_dir) / "slurm.conf", mode=mode)
    if running and started_here:  # adopted: the interrupted session's jobs would hold the nodes' CPUs
        leftover_jobs = cluster.run("squeue", "-h", "-o", "%A").stdout.split()
        if leftover_jobs:
            cluster.run("scancel", *leftover_jobs, check=False)
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "LAUNCHER_SLURM_DIR")}
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["LAUNCHER_SLURM_DIR"] = state_dir
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if started_here:
            t0 = time.monotonic()
            proc = _cluster_sh("stop", state_dir)
            print(f"\nslurm cluster stopped in {time.monotonic() - t0:.2f} s")
            if proc.returncode != 0:
                pytest.fail(f"slurm/cluster.sh stop failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
