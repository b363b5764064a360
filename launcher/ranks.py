"""The ranks of a one-node `launcher run`, started from this process without torchrun. No torch here.

torchrun's agent is a second Python that imports torch (about 3 s of CPU and 230 MB) only to
supervise. On one node its job is small, and this module does it in the `launcher run` process:
give each rank the environment torchrun gives (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free
local MASTER_PORT, ...), tee their output with torchrun's `[default<N>]:` prefixes, pass signals on,
stop the others when one rank fails (SIGTERM, then SIGKILL after the shutdown timeout), and restart
the group up to cluster.max_restarts times. launch.sh and job.sbatch keep torchrun: a multi-node
rendezvous and SLURM's steps need its agent.

The ranks begin from one interpreter that has imported torch and the rest once (launcher/zygote.py):
rank 0 is started first, imports while `launcher run` prepares the data (`spawn`), and on `go` forks
the others, which this process adopts (it is their child subreaper) and then treats as the ranks it
started itself. Where that is not available (not Linux, or LAUNCHER_FORK_RANKS=0) each rank is a
fresh `python -m launcher.runtime`.
"""

from __future__ import annotations

import contextlib
import json
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
from launcher.runtime.train.signals import STOP_SIGNALS  # the ranks' own (torch-free): held blocked in rank 0 until it handles them

POLL_SECONDS = 0.05
# After a rank failed, the others' time to leave before SIGKILL (torchrun's too); tests shorten it.
FAILURE_GRACE_SECONDS = float(os.environ.get("LAUNCHER_TEST_FAILURE_GRACE_SECONDS", 30))
Tee = Callable[[str, IO[str]], None]  # (line, console stream): write it to the console and the log
BAD_INPUT_EXIT_CODE = 2  # a rank's exit for bad input (launcher/runtime/__main__.py): never restarted
SUPERVISOR_PID = "LAUNCHER_SUPERVISOR_PID"  # in each rank's environment: the `launcher run` that started it
PR_SET_CHILD_SUBREAPER = 36


class Forked:
    """A rank rank 0 forked (launcher/zygote.py) and this process adopted: Popen's pid, poll() and returncode."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not adopted (cannot happen once the zygote reported it): its status is lost
                self.returncode = None if _exists(self.pid) else 1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen[str] | Forked
    pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def code(self) -> int:
        """Its exit status (Popen's reading: -N killed by signal N), once it has exited."""
        returncode = self.proc.returncode
        assert returncode is not None
        return int(returncode)


def fork_ranks() -> bool:
    """Whether the ranks are forked from rank 0's interpreter (launcher/zygote.py): Linux, where this
    process can adopt them (PR_SET_CHILD_SUBREAPER, set here), unless LAUNCHER_FORK_RANKS=0."""
    if os.environ.get("LAUNCHER_FORK_RANKS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


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


def pump(prefix: str, source: IO[str], sink: IO[str], tee: Tee) -> None:
    """A child's output, line by line, prefixed, to the console stream and the log (tee)."""
    with source:
        for line in source:
            tee(prefix + line, sink)


def pump_both(out: IO[str], err: IO[str], tee: Tee, prefix: str) -> list[threading.Thread]:
    """A child's stdout and stderr pumped to ours (and the log) by two daemon threads."""
    pumps = []
    for source, sink in ((out, sys.stdout), (err, sys.stderr)):
        thread = threading.Thread(target=pump, args=(prefix, source, sink, tee), daemon=True)
        thread.start()
        pumps.append(thread)
    return pumps


def start_piped(
    argv: list[str], env: dict[str, str], tee: Tee, prefix: str, fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen[str], list[threading.Thread]]:
    """A child of this process in a session of its own (a Ctrl-C at the terminal reaches `launcher run`
    only; it passes one on), its output pumped through `tee` with `prefix`."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
        env=env,
        pass_fds=fds,
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, pump_both(proc.stdout, proc.stderr, tee, prefix)


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

    def __init__(
        self, plan: Plan, env: dict[str, str], tee: Tee, restart: int = 0, argv: list[str] | None = None, fork: bool = False
    ) -> None:
        self.plan = plan
        self.argv = argv or worker_argv(plan)
        self._zygote_argv = [self.argv[0], "-m", "launcher.zygote", *self.argv[1:]] if fork else None  # rank 0 runs argv
        self._control: int | None = None  # forking: the go message's pipe to rank 0
        self._report: int | None = None  # and the forked pids' pipe back
        self._forks: list[tuple[dict[str, str], list[str], tuple[int, int]]] = []  # ranks 1..N-1: env changes, unset, output fds
        self._pumps: dict[int, list[threading.Thread]] = {}  # their output, read from the start
        self.ranks: list[Rank] = []
        self.signalled = False  # a signal was passed on: the ranks are saving, not failing
        self._signalled_with = signal.SIGTERM
        self._deadline: float | None = None  # when whatever is still running gets SIGKILL
        self._env = env
        self._tee = tee
        self._restart = restart

    def start(self) -> None:
        self.spawn()
        self.go()

    def spawn(self) -> None:
        """Forking: start rank 0 alone, importing until `go` (the data is prepared meanwhile)."""
        if self._zygote_argv is not None:
            self._start(fork=True)

    def go(self) -> None:
        """The data is ready: start the ranks, or (forking) let rank 0 fork the others, adopted here."""
        if self._zygote_argv is None:
            self._start(fork=False)
            return
        assert self._control is not None and self._report is not None
        control, report, self._control, self._report = self._control, self._report, None, None
        message = {"ranks": [{"env": env, "unset": unset, "stdout": out, "stderr": err} for env, unset, (out, err) in self._forks]}
        with contextlib.suppress(OSError), os.fdopen(control, "w") as stream:  # rank 0 died importing: its exit says why
            stream.write(json.dumps(message) + "\n")
        with os.fdopen(report, "rb") as stream:
            line = stream.readline()  # once rank 0 has imported and forked; EOF if it died first
        pids = json.loads(line)["pids"] if line.endswith(b"\n") else []
        for rank, pid in enumerate(pids, start=1):
            self.ranks.append(Rank(rank, Forked(pid), self._pumps.pop(rank, [])))
            if self.signalled:  # a signal came meanwhile: it reached rank 0 only
                send_signal(pid, self._signalled_with)

    def abort(self) -> None:
        """After `spawn`, instead of `go` (the data could not be prepared): rank 0 is stopped unused."""
        for fd in (self._control, self._report):
            if fd is not None:
                os.close(fd)
        self._control = self._report = None
        self._signal(signal.SIGKILL)
        for member in self.ranks:
            if isinstance(member.proc, subprocess.Popen):
                member.proc.wait()

    def _start(self, fork: bool) -> None:
        listener = store_socket()
        port = int(listener.getsockname()[1])
        world = int(self.plan.topology["world_size"])
        envs = [rank_env(self._env, self.plan, rank, port, self._restart) for rank in range(world)]
        for env in envs:
            os.makedirs(os.path.dirname(env["TORCHELASTIC_ERROR_FILE"]), exist_ok=True)
        envs[0]["LAUNCHER_STORE_FD"] = str(listener.fileno())
        for env in envs[1:]:
            env["LAUNCHER_STORE_CLIENT"] = "1"
        if fork:
            self._spawn_zygote(envs, listener.fileno())
        else:
            for rank, env in enumerate(envs):
                self._popen(rank, self.argv, env, (listener.fileno(),) if rank == 0 else ())
        listener.close()  # rank 0 holds it now

    def _popen(self, rank: int, argv: list[str], env: dict[str, str], fds: tuple[int, ...]) -> None:
        proc, pumps = start_piped(argv, env, self._tee, f"[default{rank}]:", fds)
        self.ranks.append(Rank(rank, proc, pumps))

    def _spawn_zygote(self, envs: list[dict[str, str]], listener: int) -> None:
        """Rank 0 (launcher/zygote.py), with the other ranks' output pipes and two of its own: the go
        message in, the forked pids out. It starts with the stop signals blocked (the mask is inherited)."""
        assert self._zygote_argv is not None
        control_read, control_write = os.pipe()
        report_read, report_write = os.pipe()
        passed = [listener, control_read, report_write]
        for rank, env in enumerate(envs[1:], start=1):
            (out_read, out_write), (err_read, err_write) = os.pipe(), os.pipe()
            passed += [out_write, err_write]
            unset = sorted(set(envs[0]) - set(env))
            self._forks.append(({k: v for k, v in env.items() if envs[0].get(k) != v}, unset, (out_write, err_write)))
            readers = [open(fd, encoding="utf-8", errors="replace") for fd in (out_read, err_read)]  # noqa: SIM115 - the pumps close them
            self._pumps[rank] = self._pump_pair(rank, *readers)
        env = {**envs[0], "LAUNCHER_ZYGOTE_CONTROL": str(control_read), "LAUNCHER_ZYGOTE_REPORT": str(report_write)}
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS (not torch's) would start a thread at import: nothing to fork
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._popen(0, self._zygote_argv, env, tuple(passed))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in passed[1:]:
                os.close(fd)
        self._control, self._report = control_write, report_read

    def _pump_pair(self, rank: int, out: IO[str], err: IO[str]) -> list[threading.Thread]:
        return pump_both(out, err, self._tee, f"[default{rank}]:")

    def alive(self) -> list[Rank]:
        return [member for member in self.ranks if member.proc.poll() is None]

    def send(self, signum: int) -> None:
        """A signal from outside (the user, the scheduler): the ranks save and stop, not a failure;
        SIGKILL for any still running after the shutdown timeout (cluster.signal_seconds, >= 2 min)."""
        self.signalled, self._signalled_with = True, signal.Signals(signum)
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
                    self._tee(f"launcher: rank {first.rank} {ended(first.code)}; stopping the other ranks\n", sys.stderr)
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
        if first.code < 0 and not self.signalled:  # no exception report will say it: a kill, the OOM killer
            self._tee(f"launcher: rank {first.rank} (pid {first.proc.pid}) {ended(first.code)}\n", sys.stderr)
        return shell_code(first.code)


class Ranks:
    """The run's ranks across restarts: `run()` until done, saved or out of restarts; `send()` from
    a signal handler reaches the current group."""

    def __init__(self, plan: Plan, env: dict[str, str], tee: Tee, argv: list[str] | None = None, fork: bool | None = None) -> None:
        self.plan = plan
        self.argv = argv  # tests give a stand-in worker; by default `python -m launcher.runtime --plan ...`
        self.fork = fork_ranks() if fork is None else fork
        self.group: RankGroup | None = None
        self._env = env
        self._tee = tee
        self._stopped: int | None = None  # the signal that asked the run to stop: no restart after it

    def send(self, signum: int) -> None:
        self._stopped = signum
        if self.group is not None:
            self.group.send(signum)

    def spawn(self) -> None:
        """The first attempt's rank 0 starts importing now (forking), while the caller prepares the data."""
        self.group = RankGroup(self.plan, self._env, self._tee, 0, self.argv, self.fork)
        self.group.spawn()

    def abort(self) -> None:
        """After `spawn`, instead of `run`: nothing runs."""
        if self.group is not None:
            self.group.abort()

    def run(self) -> int:
        restarts = int(self.plan.config["cluster"]["max_restarts"])
        for restart in range(restarts + 1):
            if restart > 0 or self.group is None:
                self.group = RankGroup(self.plan, self._env, self._tee, restart, self.argv, self.fork)
                self.group.spawn()
            self.group.go()
            if self._stopped is not None and not self.group.signalled:  # it came while they were starting
                self.group.send(self._stopped)
            code = self.group.wait()
            # Bad input (exit 2: a missing file, a refused checkpoint) fails the same way every time.
            if code in (0, REQUEUE_EXIT_CODE, BAD_INPUT_EXIT_CODE) or self._stopped is not None or restart == restarts:
                return code
            self._tee(f"launcher: restarting the ranks ({restart + 1} of cluster.max_restarts={restarts})\n", sys.stderr)
        return 1  # not reached: the last attempt returns above
