"""The training job itself on the local 2-node cluster, submitted with `launcher submit` as a user would:
it runs one rank per node and completes; USR1, SIGTERM and a real preemption (a job in the higher-priority
partition) save, requeue and resume bit-exactly; a spent retry budget and a dead rank end the job FAILED;
`launcher status` reports the job and its last step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name at run time
    from conftest import SlurmCluster

# Final job states (tests/slurm/conftest.py's FINAL_STATES; conftest modules are not importable by name).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
STEPS = 20
# One rank on each node. cpus_per_task=2 fills a node (the nodes advertise this machine's 2 cores), so
# the jobs here run one at a time and never share a core with another job.
SHAPE = ["cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.cpus_per_task=2", "cluster.partition=local"]
# Short and cheap, but every step logged; no evaluation (it does not change the training numbers).
FAST = [
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.global_batch_size=8",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "checkpoint.every=10",
]


def launcher_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """`python -m launcher ARGS` as a user types it on the login node (this machine); returns stdout."""
    argv = [sys.executable, "-m", "launcher", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"launcher {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def submit(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> int:
    """`launcher submit` the tiny recipe on two nodes; the job inherits this environment (sbatch --export=ALL),
    LAUNCHER_CACHE_DIR and the offline HF settings from tests/conftest.py included."""
    out = launcher_cli("submit", RECIPE, *SHAPE, *FAST, *overrides, "--out", str(run_dir), env=env)
    job_id = int(out.strip().splitlines()[-1])
    assert (run_dir / "logs" / "job_id").read_text().strip() == str(job_id)
    return job_id


def train_records(run_dir: Path) -> list[dict]:
    """Rank 0's per-step records so far (a line still being written is left for the next read)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return [r for r in records if "loss" in r]


def logs(run_dir: Path, job_id: int) -> tuple[str, str]:
    """(stdout, stderr) of every attempt of the job (--open-mode=append keeps them in one file each)."""
    out, err = ((run_dir / "logs" / f"tiny-cpu-{job_id}.{ext}").read_text(errors="replace") for ext in ("out", "err"))
    return out, err


def status(run_dir: Path) -> tuple[str, int | None]:
    """`launcher status RUN_DIR` -> (the job's state, the last logged step or None)."""
    out = launcher_cli("status", str(run_dir), timeout=60)
    lines = out.splitlines()
    assert lines[0].startswith("job "), out
    state = lines[0].split(":", 1)[1].split()[0]
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    return state, steps[0] if steps else None


def wait_for_steps(cluster: SlurmCluster, job_id: int, run_dir: Path, steps: int) -> None:
    cluster.wait_for(
        job_id, lambda r: r["JobState"] == "RUNNING" and len(train_records(run_dir)) >= steps, timeout=90, what=f"{steps} logged steps"
    )


@dataclass(frozen=True)
class Rank:
    pid: int
    rank: int
    world_size: int
    node: str  # SLURMD_NODENAME: the SLURM node whose slurmd started it
    hostname: str  # what the process sees; equals node in netns mode


def rank_processes(job_id: int) -> list[Rank]:
    """The job's training processes, found by their environment (torchrun's workers carry RANK and the job id).

    The runtime logs only from rank 0, so this is how the tests see which node each rank runs on."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "launcher.runtime" not in cmdline or "launcher.agent" in cmdline:
                continue
            env = proc.environ()
            if env.get("SLURM_JOB_ID") != str(job_id) or "RANK" not in env:
                continue
            uts = subprocess.run(["nsenter", f"--target={proc.pid}", "--uts", "hostname"], capture_output=True, text=True, timeout=10)
            found.append(Rank(proc.pid, int(env["RANK"]), int(env["WORLD_SIZE"]), env["SLURMD_NODENAME"], uts.stdout.strip()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, subprocess.SubprocessError, KeyError):
            continue
    return sorted(found, key=lambda r: r.rank)


@dataclass
class Job:
    run_dir: Path
    job_id: int
    record: dict[str, str]
    ranks: list[Rank] = field(default_factory=list)
    seconds: float = 0.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the tiny model and the data cache once, on the submitting machine, as `launcher prepare` is
    meant to be used; the ranks then only read it (without this they build it under a file lock)."""
    launcher_cli("prepare", RECIPE, *SHAPE, *FAST, "--out", str(tmp_path_factory.mktemp("prepare") / "run"), timeout=300)


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, prepared: None, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One uninterrupted two-node run: the subject of the first test and the reference of the resume test."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.monotonic()
    job_id = submit(run_dir)
    ranks: dict[int, Rank] = {}

    def done_and_seen(record: dict[str, str]) -> bool:
        if record["JobState"] == "RUNNING" and len(ranks) < 2:
            ranks.update((r.rank, r) for r in rank_processes(job_id))
        return record["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")

    record = slurm_cluster.wait_for(job_id, done_and_seen, timeout=120, what="the end of the job")
    return Job(run_dir, job_id, record, sorted(ranks.values(), key=lambda r: r.rank), time.monotonic() - t0)


def test_two_node_training_job_completes(slurm_cluster: SlurmCluster, reference: Job) -> None:
    run_dir, job_id, record = reference.run_dir, reference.job_id, reference.record
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert record["ExitCode"] == "0:0" and record["Restarts"] == "0"
    assert slurm_cluster.node_list(job_id) == ["n1", "n2"]

    # One rank per node, in one world of two.
    ranks = reference.ranks
    assert [(r.rank, r.world_size) for r in ranks] == [(0, 2), (1, 2)], ranks
    assert sorted(r.node for r in ranks) == ["n1", "n2"], ranks
    if slurm_cluster.mode == "netns":  # own hostname per node (loopback nodes share this machine's)
        assert [r.hostname for r in ranks] == [r.node for r in ranks], ranks
    manifest = json.loads((run_dir / "checkpoints" / "latest" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == STEPS
    assert sorted(p.stem for p in (run_dir / "checkpoints" / "latest" / "rng").iterdir()) == ["rank-00000", "rank-00001"]

    # It trained: every step logged once, the loss fell.
    losses = [r["loss"] for r in train_records(run_dir)]
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, STEPS + 1))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses

    # A complete final checkpoint, and the logs in the run directory.
    assert os.readlink(run_dir / "checkpoints" / "latest") == f"step-{STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest" / "COMPLETE").exists()
    assert record["StdOut"] == str(run_dir / "logs" / f"tiny-cpu-{job_id}.out")
    assert f"launcher: job {job_id} attempt 1 on n[1-2]" in out
    assert f"step {STEPS}/{STEPS}" in out and "launcher: done." in out
    assert "Traceback" not in err, err[-3000:]

    assert status(run_dir) == ("COMPLETED", STEPS)
    print(f"\n2-node job of {STEPS} steps: {reference.seconds:.1f} s from submit to COMPLETED")


def test_usr1_saves_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, reference: Job, tmp_path: Path) -> None:
    assert reference.record["JobState"] == "COMPLETED", "no reference: the uninterrupted run failed (see the test above)"
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job_id = submit(run_dir)
    wait_for_steps(slurm_cluster, job_id, run_dir, 2)
    state, step = status(run_dir)
    assert state == "RUNNING" and step is not None and step >= 2

    # What --signal=B:USR1@N does before the time limit: the batch shell's trap forwards it to the ranks.
    slurm_cluster.signal_batch(job_id, "USR1")
    record = slurm_cluster.wait_done(job_id, timeout=150)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert record["ExitCode"] == "0:0"
    assert slurm_cluster.restarts(job_id) == 1

    # checkpoints/REQUEUE is removed when attempt 2 starts; the log says where attempt 1 stopped.
    stopped_at = saved_step(out)
    assert 2 <= stopped_at < STEPS, out
    events = [
        f"launcher: job {job_id} attempt 1 on n[1-2]",
        "launcher: USR1 received, asking the ranks to save and stop",
        f"checkpoints/step-{stopped_at:08d} after a signal; exiting with 75",
        f"launcher: requeueing job {job_id} (requeue 1 of 3)",
        f"launcher: job {job_id} attempt 2 on n[1-2]",
        f"launcher: resuming from {run_dir}/checkpoints/step-{stopped_at:08d} at step {stopped_at}",
        "launcher: done.",
    ]
    positions = [out.find(text) for text in events]
    assert -1 not in positions and positions == sorted(positions), f"{list(zip(events, positions))}\n{out}"
    assert not (run_dir / "checkpoints" / "REQUEUE").exists()
    assert (run_dir / "checkpoints" / "latest" / "COMPLETE").exists()

    # Every step logged once (attempt 1 up to the signal, attempt 2 after it), each equal to the
    # uninterrupted run's: same loss, gradient norm and learning rate, to the bit.
    resumed = train_records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), [r["step"] for r in resumed]
    expected = {r["step"]: r for r in train_records(reference.run_dir)}
    differ = [
        (r["step"], key, r[key], expected[r["step"]][key])
        for r in resumed
        for key in ("loss", "grad_norm", "lr")
        if r[key] != expected[r["step"]][key]
    ]
    assert not differ, f"resumed at step {stopped_at}; (step, key, resumed, uninterrupted):\n{differ}"

    assert status(run_dir) == ("COMPLETED", STEPS)
    print(f"\npreempted at step {stopped_at}, requeued, completed: {time.monotonic() - t0:.1f} s")


def test_spent_retry_budget_ends_the_job_with_the_requeue_code(slurm_cluster: SlurmCluster, prepared: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "cluster.max_requeues=0")
    wait_for_steps(slurm_cluster, job_id, run_dir, 1)
    slurm_cluster.signal_batch(job_id, "USR1")
    record = slurm_cluster.wait_done(job_id, timeout=90)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "FAILED", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert record["ExitCode"] == "75:0" and record["Restarts"] == "0"
    assert "retry budget spent (0 of 0 requeues); not requeueing" in err
    assert "requeueing job" not in out

    # The checkpoint it saved is complete and named in REQUEUE: resubmitting resumes from it.
    saved = (run_dir / "checkpoints" / "REQUEUE").read_text().strip()
    assert f"launcher: saved {saved} before stopping" in out
    assert os.readlink(run_dir / "checkpoints" / "latest") == saved
    assert (run_dir / "checkpoints" / saved / "COMPLETE").exists()
    assert status(run_dir)[0] == "FAILED"


def test_a_dead_rank_fails_the_job_without_requeue(slurm_cluster: SlurmCluster, prepared: None, tmp_path: Path) -> None:
    """A rank killed outright (as by the OOM killer) must end the job FAILED at once, with no hang in
    the surviving rank's collectives, and without a requeue (no signal, so no REQUEUE marker)."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir)
    wait_for_steps(slurm_cluster, job_id, run_dir, 1)
    ranks = {r.rank: r for r in rank_processes(job_id)}
    assert sorted(ranks) == [0, 1], ranks
    victim = ranks[1]
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    record = slurm_cluster.wait_done(job_id, timeout=60)
    ended_after = time.monotonic() - t0
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "FAILED", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert record["ExitCode"] != "0:0" and record["Restarts"] == "0"
    assert ended_after < 30, f"the job took {ended_after:.0f} s to end after rank 1 died"

    # torchrun on the victim's node names the rank, its host and the signal; the script says it failed.
    assert "rank      : 1 (local_rank: 0)" in err and f"Signal 9 (SIGKILL) received by PID {victim.pid}" in err, err[-4000:]
    if slurm_cluster.mode == "netns":  # torchrun names a host by its socket.getfqdn(): n2's name shares 127.0.0.1 with localhost there
        assert f"host      : {'localhost' if victim.node == 'n2' else victim.node}" in err
    assert "launcher: training step failed with exit code" in err
    assert not (run_dir / "checkpoints" / "REQUEUE").exists()
    assert "requeueing job" not in out
    state, step = status(run_dir)
    assert state == "FAILED" and step is not None and step >= 1


def assert_same_steps(run_dir: Path, reference: Path, note: str) -> None:
    """Every step logged once and equal to the uninterrupted run's (loss, gradient norm, lr), to the bit."""
    resumed = train_records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), [r["step"] for r in resumed]
    expected = {r["step"]: r for r in train_records(reference)}
    differ = [
        (r["step"], key, r[key], expected[r["step"]][key])
        for r in resumed
        for key in ("loss", "grad_norm", "lr")
        if r[key] != expected[r["step"]][key]
    ]
    assert not differ, f"{note}; (step, key, resumed, uninterrupted):\n{differ}"


def in_order(text: str, events: list[str]) -> None:
    positions = [text.find(event) for event in events]
    assert -1 not in positions and positions == sorted(positions), f"{list(zip(events, positions))}\n{text[-6000:]}"


def status_text(run_dir: Path) -> str:
    return launcher_cli("status", str(run_dir), timeout=60)


def saved_step(out: str) -> int:
    """The step attempt 1 saved at (`launcher: saved step-N before stopping`, printed once)."""
    saved = [line for line in out.splitlines() if line.startswith("launcher: saved step-")]
    assert len(saved) == 1, out
    return int(saved[0].split()[2].removeprefix("step-"))


def test_preemption_saves_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, reference: Job, tmp_path: Path) -> None:
    """A real preemption: a job in the `high` partition (higher PriorityTier, same nodes) needs both nodes
    while the training job runs in the default one. slurmctld 22.05 sends SIGCONT and SIGTERM to the
    job's steps only (torchrun and the ranks; not the batch shell, so not srun, which would SIGKILL its
    step) and requeues the job itself after the partition's GraceTime. The ranks save at the next step
    boundary and exit 75, the script requeues the job before GraceTime runs out, the high job runs, and
    the next attempt resumes bit-exactly."""
    assert reference.record["JobState"] == "COMPLETED", "no reference: the uninterrupted run failed"
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job_id = submit(run_dir)
    wait_for_steps(slurm_cluster, job_id, run_dir, 2)
    ctld_log = slurm_cluster.state_dir / "log" / "slurmctld.log"
    ctld_before = ctld_log.stat().st_size
    high_out = tmp_path / "high-%j.out"
    argv = ["sbatch", "--parsable", f"--partition={slurm_cluster.high_partition}", "--nodes=2", "--exclusive"]
    high_id = int(slurm_cluster.run(*argv, f"--output={high_out}", "--wrap", "sleep 2").stdout.strip().split(";")[0])
    record = slurm_cluster.wait_done(job_id, timeout=150)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED" and slurm_cluster.restarts(job_id) == 1, f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    high = slurm_cluster.wait_done(high_id, timeout=30)
    assert high["JobState"] == "COMPLETED" and high["Partition"] == slurm_cluster.high_partition, high

    # The high job ran between the two attempts: on the nodes attempt 1 gave up, before attempt 2 began.
    assert high["NodeList"] == "n[1-2]" and high["EndTime"] <= record["StartTime"], (high, record)
    stopped_at = saved_step(out)
    in_order(
        out,
        [
            f"launcher: job {job_id} attempt 1 on n[1-2]",
            f"checkpoints/step-{stopped_at:08d} after a signal; exiting with 75",
            f"launcher: saved step-{stopped_at:08d} before stopping",
            f"launcher: requeueing job {job_id} (requeue 1 of 3)",
            f"launcher: job {job_id} attempt 2 on n[1-2] ",
            f"launcher: resuming from {run_dir}/checkpoints/step-{stopped_at:08d} at step {stopped_at}",
            "launcher: done.",
        ],
    )
    # What reached whom: SIGTERM to the ranks; nothing to the batch shell (no trap ran, not even the
    # --signal=B:USR1 one) nor to srun (which would have printed "forcing job termination").
    assert "received SIGTERM; saving at the next step boundary" in err, err[-3000:]
    assert "received, asking the ranks to save and stop" not in out and "forcing job termination" not in err, out[-3000:] + err[-3000:]
    # The script requeued the job inside GraceTime: slurmctld never had to requeue (or kill) it itself.
    ctld = ctld_log.read_text(errors="replace")[ctld_before:]
    assert f"JobId={job_id} has been requeued to reclaim resources" not in ctld and f"JobId={job_id} had to be killed" not in ctld, ctld
    assert_same_steps(run_dir, reference.run_dir, f"preempted at step {stopped_at}")
    assert "state: done" in status_text(run_dir)
    print(f"\npreempted at step {stopped_at} by job {high_id}, saved, requeued, completed: {time.monotonic() - t0:.1f} s")


def test_term_to_the_batch_shell_saves_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, reference: Job, tmp_path: Path) -> None:
    """SIGTERM to the batch shell alone (`scancel --batch --signal=TERM`): its trap passes it on to the
    steps, the save finishes before anything kills the ranks, the job requeues itself and resumes
    bit-exactly. (`--full` would also signal srun, which SIGKILLs its step on TERM: see job.sbatch.)"""
    assert reference.record["JobState"] == "COMPLETED", "no reference: the uninterrupted run failed"
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job_id = submit(run_dir)
    wait_for_steps(slurm_cluster, job_id, run_dir, 2)
    slurm_cluster.signal_batch(job_id, "TERM")
    record = slurm_cluster.wait_done(job_id, timeout=150)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED" and slurm_cluster.restarts(job_id) == 1, f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    stopped_at = saved_step(out)
    in_order(
        out,
        [
            f"launcher: job {job_id} attempt 1 on n[1-2]",
            "launcher: TERM received, asking the ranks to save and stop",
            f"checkpoints/step-{stopped_at:08d} after a signal; exiting with 75",
            f"launcher: requeueing job {job_id} (requeue 1 of 3)",
            f"launcher: job {job_id} attempt 2 on n[1-2] ",
            f"launcher: resuming from {run_dir}/checkpoints/step-{stopped_at:08d} at step {stopped_at}",
            "launcher: done.",
        ],
    )
    assert "received SIGTERM; saving at the next step boundary" in err
    assert_same_steps(run_dir, reference.run_dir, f"TERM at step {stopped_at}")
    assert "state: done" in status_text(run_dir)
    print(f"\nTERM at step {stopped_at}, saved, requeued, completed: {time.monotonic() - t0:.1f} s")


def test_a_rank_that_raises_requeues_from_the_last_checkpoint_and_finishes(
    slurm_cluster: SlurmCluster, reference: Job, tmp_path: Path
) -> None:
    """Rank 1 raises right after the step-10 save (a crash, no signal): the job requeues itself from
    that checkpoint within the failure budget and finishes with the uninterrupted run's numbers."""
    assert reference.record["JobState"] == "COMPLETED", "no reference: the uninterrupted run failed"
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, env={"LAUNCHER_TEST_RAISE_AT_STEP": "10"})
    record = slurm_cluster.wait_done(job_id, timeout=150)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED" and slurm_cluster.restarts(job_id) == 1, f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    in_order(
        out,
        [
            f"launcher: job {job_id} attempt 1 on n[1-2]",
            "launcher: failed: rank 1 on ",
            f"launcher: requeueing job {job_id} after a failure (failure requeue 1 of 2); resuming from step-00000010",
            f"launcher: job {job_id} attempt 2 on n[1-2] ",
            "from checkpoint step-00000010",
            f"launcher: resuming from {run_dir}/checkpoints/step-00000010 at step 10",
            "launcher: done.",
        ],
    )
    line = next(line for line in out.splitlines() if line.startswith("launcher: failed: rank 1 on "))
    assert "RuntimeError: LAUNCHER_TEST_RAISE_AT_STEP=10: test failure on rank 1 at " in line and "dist.py:" in line, line
    assert_same_steps(run_dir, reference.run_dir, "crash after step 10")


def test_a_rank_that_always_crashes_ends_failed_with_one_line(slurm_cluster: SlurmCluster, prepared: None, tmp_path: Path) -> None:
    """Rank 1 raises at step 4 in every attempt: attempt 1 left step 3, so it requeues once; attempt 2
    made no progress, so the job ends FAILED with the rank's exception and the reason, in one line."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "checkpoint.every=3", env={"LAUNCHER_TEST_RAISE_AT_STEP": "4"})
    record = slurm_cluster.wait_done(job_id, timeout=150)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert slurm_cluster.restarts(job_id) == 1
    assert "after a failure (failure requeue 1 of 2); resuming from step-00000003" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("launcher: failed: rank 1 on ") and "RuntimeError: LAUNCHER_TEST_RAISE_AT_STEP=4" in last, err[-3000:]
    assert last.endswith("no checkpoint newer than this attempt's start (step-00000003): not requeueing a crash loop"), last
    status = status_text(run_dir)
    assert status.splitlines()[0].startswith(f"job {job_id}: FAILED  attempt 2"), status
    assert f"state: failed (job {job_id}, attempt 2, since " in status and last.removeprefix("launcher: ") in status, status
    assert "last complete checkpoint: step-00000003" in status


def test_failure_requeue_budget_is_separate_and_can_be_zero(slurm_cluster: SlurmCluster, prepared: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "cluster.max_failure_requeues=0", "checkpoint.every=2", env={"LAUNCHER_TEST_RAISE_AT_STEP": "2"})
    record = slurm_cluster.wait_done(job_id, timeout=120)
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    assert err.strip().splitlines()[-1].endswith("failure requeue budget spent (0 of 0)"), err[-3000:]


def preparing_with_handler(job_id: int) -> bool:
    """The job's prepare step (`python -m launcher.runtime --prepare-only`, not the srun that started it)
    runs and catches USR1 (SigCgt in /proc)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if cmdline[1:3] != ["-m", "launcher.runtime"] or "--prepare-only" not in cmdline:
                continue
            if proc.environ().get("SLURM_JOB_ID") == str(job_id):
                status = Path(f"/proc/{proc.pid}/status").read_text()
                caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
                return bool(caught >> (signal.SIGUSR1 - 1) & 1)
        except (psutil.Error, OSError):
            continue
    return False


def test_sbatch_alone_prepares_the_data_and_runs_the_ranks_offline(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The plan's printed command, `sbatch job.sbatch`, with nothing prepared beforehand (an empty cache)
    and no offline setting in the submitting shell: one task prepares, then the ranks start offline.
    USR1 while the first attempt prepares (seconds of work here: the cache is cold) stops that step at
    once; the job requeues itself and the next attempt prepares in full."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")} | {"LAUNCHER_CACHE_DIR": str(cache)}
    run_dir = tmp_path / "run"
    # Two steps (one of warm-up): what is checked here is the way to the ranks, not the training.
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "plan",
        RECIPE,
        *SHAPE,
        *FAST,
        "train.max_steps=2",
        "optim.warmup_steps=1",
        "--out",
        str(run_dir),
    ]
    subprocess.run(argv, check=True, capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert not cache.exists()
    done = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True, env=env, check=True)
    job_id = int(done.stdout.strip().split(";")[0])
    slurm_cluster.wait_for(job_id, lambda _: preparing_with_handler(job_id), timeout=60, what="the prepare step, USR1 handler set")
    slurm_cluster.signal_batch(job_id, "USR1")
    seen: dict[int, dict[str, str]] = {}

    def done_and_seen(record: dict[str, str]) -> bool:
        if record["JobState"] == "RUNNING" and len(seen) < 2:
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    cmdline = proc.info["cmdline"] or []
                    environ = proc.environ() if "launcher.runtime" in cmdline and "--prepare-only" not in cmdline else {}
                except psutil.Error:
                    continue
                if environ.get("SLURM_JOB_ID") == str(job_id) and "RANK" in environ:
                    seen[int(environ["RANK"])] = environ
        return record["JobState"] in FINAL_STATES

    record = slurm_cluster.wait_for(job_id, done_and_seen, timeout=180, what="the end of the job")
    out, err = logs(run_dir, job_id)
    assert record["JobState"] == "COMPLETED" and slurm_cluster.restarts(job_id) == 1, f"{record}\n{out[-3000:]}\n{err[-3000:]}"
    in_order(
        out,
        [
            f"launcher: job {job_id} attempt 1 on n[1-2]",
            "launcher: USR1 received, asking the ranks to save and stop",
            "launcher: preparing the data stopped on a signal",
            f"launcher: requeueing job {job_id} (requeue 1 of 3) to prepare the data again",
            f"launcher: job {job_id} attempt 2 on n[1-2]",
            "launcher: data prepared on n1",
            "launcher: rank 0 of 2",
            "launcher: done.",
        ],
    )
    assert out.count("launcher: data prepared on n1") == 1, out[-3000:]
    assert "launcher: received SIGUSR1 while preparing the data; stopped (run again to prepare again)" in err, err[-3000:]
    assert "preparing the data failed" not in err and "Traceback" not in err, err[-3000:]
    assert any(cache.glob("tiny-llama-*")) and any((cache / "data").iterdir()), sorted(cache.rglob("*"))[:10]
    assert sorted(seen) == [0, 1], seen.keys()
    for rank, environ in seen.items():
        assert environ["HF_HUB_OFFLINE"] == "1" and environ["HF_DATASETS_OFFLINE"] == "1", rank
        assert environ["PYTHONFAULTHANDLER"] == "1" and environ["LAUNCHER_CACHE_DIR"] == str(cache)
    # srun --label: each line of the ranks' output says which node task wrote it.
    assert any(line.startswith("1: [default0]:launcher: rank 1 of 2") for line in out.splitlines()), out[-3000:]
