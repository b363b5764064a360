"""Rank 0 of a one-node `launcher run`, and the interpreter the other ranks are forked from. No torch
at import: what it imports is the target's business (its `preload`).

`python -m launcher.zygote -m MODULE ARGS...` (or `-c CODE`: the tests' stand-in ranks) is started by
launcher/ranks.py with rank 0's environment while `launcher run` prepares the data. It imports what
every rank imports (MODULE's `preload(ARGS)`: torch, transformers, the model's code) once, waits for
the word go, forks ranks 1..N-1 (each a copy of this interpreter, those imports done, their pages
shared), and then runs `MODULE.main(ARGS)` as rank 0. A rank used to pay a fresh interpreter and
every import itself: about 3 s of CPU each, most of a small run's start.

Each forked rank goes through a middle process that exits at once, so the rank is re-parented to
`launcher run` (a child subreaper, PR_SET_CHILD_SUBREAPER), which waits for it, signals it and reads
its output (its own pipes, passed here) as for the rank it used to start itself; the ranks never
depend on rank 0 staying alive. Safe to fork: the preload only imports (no CUDA context: each rank
initialises CUDA itself, after), and no thread runs at the fork (checked; numpy's and scipy's
OpenBLAS would start one each, so rank 0 starts with OPENBLAS_NUM_THREADS=1 unless the environment
says otherwise; if a library started one anyway, the forked processes exec a fresh interpreter at
once, as before). The collector's objects are frozen first, so the ranks share them, not copy them.

The stop signals (USR1, TERM, INT, HUP, QUIT) arrive blocked, from `launcher run` on: one that comes
while the imports run is held, not lost. A target with a `preload` unblocks them once its own
handlers are in place (launcher/runtime/__main__.py, after its StopFlag); a `-c` target gets them
unblocked before it runs. Rank 0 then stops at the first step boundary and the others agree.

Not under launch.sh and job.sbatch: there torchrun's agent starts each rank, as a process it
watches by pid, and forking them from a pre-imported parent would mean a function entrypoint under
the agent's fork start method, in an agent that must then never touch CUDA (torchrun asks CUDA for
the device count with `--nproc-per-node gpu`, and a CUDA runtime does not survive a fork), which no
GPU here can prove. The gain is also small there: on a GPU node every rank has cores of its own and
imports in parallel with the others, where CUDA and NCCL set-up take longer than the imports.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from launcher.runtime.train.signals import STOP_SIGNALS

CONTROL = "LAUNCHER_ZYGOTE_CONTROL"  # fd: the go message from `launcher run` (one JSON line), or EOF: give up
REPORT = "LAUNCHER_ZYGOTE_REPORT"  # fd: the forked ranks' pids, one JSON line back
REPARENT_SECONDS = 10.0  # a forked rank waits this long to become `launcher run`'s child


def main(argv: list[str]) -> NoReturn:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already, from `launcher run`'s spawn
    from launcher.ranks import die_with_supervisor

    die_with_supervisor()
    target = _Target(argv)
    target.preload()
    go = _read_line(int(os.environ.pop(CONTROL)))
    report = int(os.environ.pop(REPORT))
    if go is None:  # `launcher run` gave up before the ranks (the data could not be prepared)
        os._exit(0)
    ranks = json.loads(go)["ranks"]
    theirs = [fd for spec in ranks for fd in (spec["stdout"], spec["stderr"])]
    mine = [report, *_store_fd()]
    sys.stdout.flush()
    sys.stderr.flush()
    pids = [_fork_rank(spec, target, close=[fd for fd in theirs if fd not in (spec["stdout"], spec["stderr"])] + mine) for spec in ranks]
    for fd in theirs:
        os.close(fd)
    with contextlib.suppress(OSError):  # `launcher run` gone: PR_SET_PDEATHSIG ends us anyway
        os.write(report, (json.dumps({"pids": pids}) + "\n").encode())
    os.close(report)
    target.run()


def threads() -> int:
    """Threads of this process (Linux): forking is safe only with one."""
    return len(os.listdir("/proc/self/task"))


class _Target:
    """What each rank runs, as Python's own command line says it: `-m MODULE ARGS` (MODULE.main(ARGS)
    -> exit code, a package's __main__; MODULE.preload(ARGS) once here first, if it has one) or
    `-c CODE ARGS` (the tests' stand-in ranks)."""

    def __init__(self, argv: list[str]) -> None:
        self.code: str | None = None
        self.module: Any = None
        if argv[:1] == ["-c"]:
            self.code = argv[1]
        elif argv[:1] == ["-m"]:
            self.module = importlib.import_module(argv[1])
            if hasattr(self.module, "__path__"):  # a package runs as its __main__
                self.module = importlib.import_module(argv[1] + ".__main__")
        else:
            raise SystemExit(f"usage: python -m launcher.zygote (-m MODULE | -c CODE) ARGS..., not {argv[:2]}")
        self.argv, self.args = argv, argv[2:]
        self.hook: Callable[[list[str]], None] | None = getattr(self.module, "preload", None)
        self.forkable = True

    def preload(self) -> None:
        if self.hook is not None:
            self.hook(self.args)
        if threads() != 1:  # a library started a thread while imported: a copy running on could deadlock on its locks
            print(
                f"launcher: {threads()} threads after rank 0's imports (a library started them); the other ranks "
                "start as fresh interpreters instead of copies of it",
                file=sys.stderr,
                flush=True,
            )
            self.forkable = False

    def exec(self) -> NoReturn:
        """This rank as a fresh interpreter (what forking saves), for a parent that was not safe to copy on from."""
        os.execv(sys.executable, [sys.executable, *self.argv])

    def run(self) -> NoReturn:
        """Run the target in this process and exit with its code, never returning to the caller."""
        code = 1
        try:
            if self.code is not None:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                sys.argv = ["-c", *self.args]
                exec(compile(self.code, "<string>", "exec"), {"__name__": "__main__"})
                code = 0
            else:
                if self.hook is None:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                sys.argv = [self.module.__file__, *self.args]
                code = int(self.module.main(self.args) or 0)
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _read_line(fd: int) -> str | None:
    """One line from fd (blocking; the stop signals are blocked, so no EINTR); None at EOF."""
    with os.fdopen(fd, "rb") as stream:
        line = stream.readline()
    return line.decode() if line.endswith(b"\n") else None


def _store_fd() -> list[int]:
    return [int(os.environ["LAUNCHER_STORE_FD"])] if "LAUNCHER_STORE_FD" in os.environ else []


def _fork_rank(spec: dict[str, Any], target: _Target, close: list[int]) -> int:
    """Fork one rank through a middle process that exits at once; the rank's pid."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process: fork the rank, say its pid, leave
        code = 1
        try:
            os.close(read)
            pid = os.fork()
            if pid == 0:
                os.close(write)
                _become_rank(spec, target, close)  # never returns
            os.write(write, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        text = stream.read()
    os.waitpid(middle, 0)
    if not text:
        raise SystemExit("launcher.zygote: a rank could not be forked")
    return int(text)


def _become_rank(spec: dict[str, Any], target: _Target, close: list[int]) -> NoReturn:
    try:
        os.setsid()  # as start_new_session: a Ctrl-C at the terminal reaches `launcher run` alone
        os.dup2(spec["stdout"], 1)
        os.dup2(spec["stderr"], 2)
        for fd in {*close, spec["stdout"], spec["stderr"]}:
            with contextlib.suppress(OSError):
                os.close(fd)
        for name in spec.get("unset", []):
            os.environ.pop(name, None)
        os.environ.update(spec["env"])
        supervisor = int(os.environ["LAUNCHER_SUPERVISOR_PID"])
        deadline = time.monotonic() + REPARENT_SECONDS
        while os.getppid() != supervisor:  # the middle process is exiting: `launcher run` (the subreaper) adopts us
            if time.monotonic() > deadline:
                print(f"launcher.zygote: rank {os.environ.get('RANK')} was not adopted by launcher run ({supervisor})", file=sys.stderr)
                os._exit(1)
            time.sleep(0.001)
        from launcher.ranks import die_with_supervisor

        die_with_supervisor()  # PR_SET_PDEATHSIG is not inherited across fork: set it again
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if not target.forkable:
        target.exec()
    target.run()


if __name__ == "__main__":
    main(sys.argv[1:])
