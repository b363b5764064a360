"""The ranks of a one-node `launcher run`, started from this process without torchrun. No torch here.

torchrun's agent is a second Python that imports torch (about 3 s of CPU and 230 MB) only to
supervise. On one node its job is small, and this module does it in the `launcher run` process:
give each rank the environment torchrun gives (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free
local MASTER_PORT, ...), tee their output with torchrun's `[default<N>]:` prefixes, pass signals on,
stop the others when one rank fails (SIGTERM, then SIGKILL after the shutdown timeout), and restart
the group up to cluster.max_restarts times. launch.sh and job.sbatch keep torchrun: a multi-node
rendezvous and SLURM's steps need its agent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from launcher.plan import Plan
from launcher.plan.slurm import REQUEUE_EXIT_CODE  # the ranks saved after a signal: not a failure to restart from
from launcher.plan.torchrun import shutdown_timeout

POLL_SECONDS = 0.05
# After a rank failed, the others' time to leave before SIGKILL (torchrun's too); tests shorten it.
FAILURE_GRACE_SECONDS = float(os.environ.get("LAUNCHER_TEST_FAILURE_GRACE_SECONDS", 30))
Tee = Callable[[str, IO[str]], None]  # (line, console stream): write it to the console and the log
BAD_INPUT_EXIT_CODE = 2  # a rank's exit for bad input (launcher/runtime/__main__.py): never restarted
SUPERVISOR_PID = "LAUNCHER_SUPERVISOR_PID"  # in each rank's environment: the `launcher run` that started it


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen[str]
    pumps: list[threading.Thread] = field(default_factory=list)


def store_socket() -> socket.socket:
    """The rendezvous port, bound and listening here, then handed to rank 0 (LAUNCHER_STORE_FD), whose
    store serves on it (runtime/parallel/dist.py): chosen and used without ever being free between,
    so no other process can take it (a port found free and released could be)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def rank_env(base: dict[str, str], plan: Plan, rank: int, port: int, restart: int) -> dict[str, str]:
    """What torchrun gives a worker on one node, over the run's own variables (launch.sh's exports)."""
    world = str(plan.topology["world_size"])
    return {
        **plan.env_defaults,  # launch.sh's `: "${NAME:=value}"`: the environment wins
        **base,
        **plan.env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": world,
        "ROLE_WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": str(plan.config["run"]["name"]),
        "TORCHELASTIC_RESTART_COUNT": str(restart),
        "TORCHELASTIC_MAX_RESTARTS": str(plan.config["cluster"]["max_restarts"]),
        "GROUP_WORLD_SIZE": "1",  # one node, one agent (this process)
        # Where torch's @record error handler (and libraries using it) write a failure, as under torchrun.
        "TORCHELASTIC_ERROR_FILE": os.path.join(plan.run_dir, "logs", "torchrun", f"attempt_{restart}", str(rank), "error.json"),
        SUPERVISOR_PID: str(os.getpid()),
    }


def die_with_supervisor() -> None:
    """In a rank `launcher run` started: be SIGKILLed when that process dies (Linux PR_SET_PDEATHSIG),
    so a `launcher run` killed with SIGKILL or by the OOM killer leaves no rank running under init,
    its output unread; exit at once if it is already gone. The last complete checkpoint stays: a
    save cut off has no COMPLETE marker. Nothing to do under torchrun (no LAUNCHER_SUPERVISOR_PID)."""
    supervisor = os.environ.get(SUPERVISOR_PID)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(supervisor):  # it died before the line above: nobody would ever kill us
        os._exit(1)


def worker_argv(plan: Plan) -> list[str]:
    """A rank's command: the interpreter the plan was made with, the per-rank runtime, the plan."""
    return [plan.torchrun[0], "-m", "launcher.runtime", "--plan", plan.plan_path]


def send_signal(pid: int, signum: int) -> None:
    """os.kill, for a process that may have exited meanwhile."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def shell_code(returncode: int) -> int:
    """A shell's reading of a child's end: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


class RankGroup:
    """One attempt's ranks: started together, signalled together, stopped together."""

    def __init__(self, plan: Plan, env: dict[str, str], tee: Tee, restart: int = 0, argv: list[str] | None = None) -> None:
        self.plan = plan
        self.argv = argv or worker_argv(plan)
        self.ranks: list[Rank] = []
        self.signalled = False  # a signal was passed on: the ranks are saving, not failing
        self._deadline: float | None = None  # when whatever is still running gets SIGKILL
        self._env = env
        self._tee = tee
        self._restart = restart

    def start(self) -> None:
        listener = store_socket()
        port = int(listener.getsockname()[1])
        for rank in range(int(self.plan.topology["world_size"])):
            env = rank_env(self._env, self.plan, rank, port, self._restart)
            os.makedirs(os.path.dirname(env["TORCHELASTIC_ERROR_FILE"]), exist_ok=True)
            env.update({"LAUNCHER_STORE_FD": str(listener.fileno())} if rank == 0 else {"LAUNCHER_STORE_CLIENT": "1"})
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a Ctrl-C at the terminal reaches `launcher run` only; it passes one on
                env=env,
                pass_fds=(listener.fileno(),) if rank == 0 else (),
            )
            member = Rank(rank, proc)
            for source, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                pump = threading.Thread(target=self._pump, args=(f"[default{rank}]:", source, sink), daemon=True)
                pump.start()
                member.pumps.append(pump)
            self.ranks.append(member)
        listener.close()  # rank 0 holds it now

    def _pump(self, prefix: str, source: IO[str] | None, sink: IO[str]) -> None:
        assert source is not None
        for line in source:
            self._tee(prefix + line, sink)

    def alive(self) -> list[Rank]:
        return [member for member in self.ranks if member.proc.poll() is None]

    def send(self, signum: int) -> None:
        """A signal from outside (the user, the scheduler): the ranks save and stop, not a failure;
        SIGKILL for any still running after the shutdown timeout (cluster.signal_seconds, >= 2 min)."""
        self.signalled = True
        self._signal(signum)
        if self._deadline is None:
            self._deadline = time.monotonic() + shutdown_timeout(int(self.plan.config["cluster"]["signal_seconds"]))

    def _signal(self, signum: int) -> None:
        for member in self.alive():
            send_signal(member.proc.pid, signum)

    def wait(self) -> int:
        """Until every rank has exited; the exit code of the first rank that failed, else 0. After a
        failure the others get SIGTERM, and SIGKILL 30 s later, as under torchrun."""
        first: Rank | None = None
        while self.alive():
            if first is None:
                first = next((m for m in self.ranks if m.proc.returncode not in (None, 0)), None)
                if first is not None and not self.signalled:
                    self._tee(f"launcher: rank {first.rank} {ended(first.proc.returncode)}; stopping the other ranks\n", sys.stderr)
                    self._signal(signal.SIGTERM)
                    self._deadline = time.monotonic() + FAILURE_GRACE_SECONDS
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._tee("launcher: ranks still running after the grace period; killing them\n", sys.stderr)
                self._signal(signal.SIGKILL)
                self._deadline = float("inf")
            time.sleep(POLL_SECONDS)
        for member in self.ranks:
            for pump in member.pumps:
                pump.join(timeout=10)
        first = first or next((m for m in self.ranks if m.proc.returncode != 0), None)
        if first is None:
            return 0
        if first.proc.returncode < 0 and not self.signalled:  # no exception report will say it: a kill, the OOM killer
            self._tee(f"launcher: rank {first.rank} (pid {first.proc.pid}) {ended(first.proc.returncode)}\n", sys.stderr)
        return shell_code(first.proc.returncode)


class Ranks:
    """The run's ranks across restarts: `run()` until done, saved or out of restarts; `send()` from
    a signal handler reaches the current group."""

    def __init__(self, plan: Plan, env: dict[str, str], tee: Tee, argv: list[str] | None = None) -> None:
        self.plan = plan
        self.argv = argv  # tests give a stand-in worker; by default `python -m launcher.runtime --plan ...`
        self.group: RankGroup | None = None
        self._env = env
        self._tee = tee
        self._stopped: int | None = None  # the signal that asked the run to stop: no restart after it

    def send(self, signum: int) -> None:
        self._stopped = signum
        if self.group is not None:
            self.group.send(signum)

    def run(self) -> int:
        restarts = int(self.plan.config["cluster"]["max_restarts"])
        for restart in range(restarts + 1):
            self.group = RankGroup(self.plan, self._env, self._tee, restart, self.argv)
            self.group.start()
            if self._stopped is not None and not self.group.signalled:  # it came while they were starting
                self.group.send(self._stopped)
            code = self.group.wait()
            # Bad input (exit 2: a missing file, a refused checkpoint) fails the same way every time.
            if code in (0, REQUEUE_EXIT_CODE, BAD_INPUT_EXIT_CODE) or self._stopped is not None or restart == restarts:
                return code
            self._tee(f"launcher: restarting the ranks ({restart + 1} of cluster.max_restarts={restarts})\n", sys.stderr)
        return 1  # not reached: the last attempt returns above
