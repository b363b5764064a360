"""One run owns its directory at a time: an OS lock (flock) on RUN_DIR/run.lock.

The lock belongs to an open file, so it dies with the process that holds it (a crash or SIGKILL
leaves nothing to clean up). `launcher run` takes it before writing the plan and keeps it while
its ranks run; they see their ancestor as the holder and go on. Under SLURM there is no
`launcher run`: rank 0 of the runtime takes it. A second run on the same directory is refused
with the holder's pid and host, before anything is written. No torch here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from launcher.config.errors import ConfigError, Problem
from launcher.plan.resume import CheckpointError

LOCK_FILE = "run.lock"
_held: dict[str, int] = {}  # run dir -> the open descriptor holding its lock (this process)


class RunDirBusy(CheckpointError):
    """Another process owns the run directory; one line for the user."""


def _ancestors() -> set[int]:
    """The pids above this process (Linux /proc; empty elsewhere)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the state is the parent pid
    return found


def _holder(path: Path) -> tuple[int, str]:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return -1, "unknown"


def acquire(run_dir: str | os.PathLike[str]) -> bool:
    """Take the lock (creating the directory and lock file); True if taken now, False if this
    process or one of its ancestors on this host already holds it. RunDirBusy otherwise."""
    folder = Path(run_dir)
    key = str(folder.resolve())
    if key in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:  # a link planted at run.lock would have the truncation below empty whatever it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RunDirBusy(f"{path}: is a symbolic link, not the run's lock file; remove it (rm {path})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirBusy(f"{path}: is not a regular file (a FIFO, a device or a folder); remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: no locks on this file system
            os.close(fd)
            print(f"warning: {folder}: this file system has no file locks ({exc.strerror}); a second run is not kept out", file=sys.stderr)
            return False
        os.close(fd)
        pid, host = _holder(path)
        if host == socket.gethostname() and pid in _ancestors():
            return False  # `launcher run` above us holds it for this very run
        raise RunDirBusy(
            f"{folder}: another run owns this directory (pid {pid} on {host}); wait for it to finish, or write elsewhere (--out DIR)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[key] = fd
    return True


def release(run_dir: str | os.PathLike[str]) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def holding(run_dir: str | os.PathLike[str], key: str = "--out") -> Iterator[None]:
    """The lock for the duration of a command; RunDirBusy becomes a ConfigError line (exit 2)."""
    try:
        taken = acquire(run_dir)
    except RunDirBusy as exc:
        folder, _, rest = str(exc).partition(": ")
        what, _, fix = rest.rpartition("; ")
        raise ConfigError([Problem(folder, what, fix)]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(run_dir), f"cannot create the run directory ({exc.strerror})", "choose a writable --out")]) from None
    try:
        yield
    finally:
        if taken:
            release(run_dir)
