"""Files a run writes into its directory, written so that nothing planted there can redirect them: each
is written beside its name and renamed into place, so a symbolic link (or a FIFO) at that name is
replaced, never followed or opened; a file appended to (metrics.jsonl, logs/launcher.log) is opened
without following a link and refused unless it is a regular file. Also: reading what a run wrote
without blocking, and telling a run directory from a folder of someone else's files. No torch here:
`launcher plan`, `launcher run` and the ranks use it."""

from __future__ import annotations

import errno
import json
import os
import shlex
import stat
import tempfile
from pathlib import Path
from typing import TextIO

from launcher.config.errors import ConfigError, Problem


def umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: Path, text: str, mode: int | None = None, fsync: bool = False) -> Path:
    """Write `text` to a new file beside `path` (O_EXCL: never an existing file or link), then rename
    it over `path`, with `mode` (default: what the umask gives a new file, as open() would). A file
    being replaced keeps its old content if the write fails. `fsync`: on disk before the rename
    (checkpoint manifests and markers)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Opening a name for writing without following a symbolic link at it, and without blocking on a FIFO
# (with O_NONBLOCK a FIFO no process reads fails at once, ENXIO; one that is read is refused below).
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_append(path: Path, truncate: bool = False) -> TextIO:
    """`path` opened to append to (created if absent, as open() would), or emptied first with
    `truncate`: never through a symbolic link planted at that name (the file it points to would
    grow, or be emptied), and never a FIFO, a device or a folder. ConfigError naming it otherwise."""
    try:
        fd = os.open(path, _APPEND, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(path, f"is a symbolic link (to {os.path.realpath(path)})") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            raise _refused(path, "is not a regular file (a FIFO, a device or a folder)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refused(path, "is not a regular file (a FIFO, a device or a folder)")
    os.set_blocking(fd, True)
    if truncate:
        os.ftruncate(fd, 0)  # after the check: a file that is not the run's own is never emptied
    return os.fdopen(fd, "a", encoding="utf-8")


def _refused(path: Path, what: str) -> ConfigError:
    return ConfigError([Problem(str(path), what, f"remove it (rm {shlex.quote(str(path))}); the run writes the file itself")])


def read_small(path: Path, limit: int = 1 << 16, tail: bool = False) -> str | None:
    """The first `limit` bytes of a text file the run wrote (with `tail`: the last ones, from the start
    of a line), or None when it is absent, unreadable or not a regular file (a FIFO would block the
    read); undecodable bytes are replaced, never raised: `launcher status` reads whatever it finds."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        start = max(info.st_size - limit, 0) if tail else 0
        os.lseek(fd, start, os.SEEK_SET)
        data = b""
        while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line was cut: whole lines only
    return data.decode("utf-8", "replace")


# What a folder may hold before `launcher plan` first writes its plan.json: the lock and logs/ of a plan
# that stopped before writing (a full disk), and checkpoints brought in to resume from.
BEFORE_PLAN = frozenset({"run.lock", "logs", "checkpoints"})
PLAN_KEYS = frozenset({"launcher_version", "run_dir", "config", "topology"})  # in every plan.json `launcher plan` writes


def foreign_folder(run_dir: Path) -> str | None:
    """Why `run_dir` holds someone else's files rather than a run (its config.yaml, launch.sh and
    logs would be written over them), or None: absent, empty, or a run directory (a plan.json
    `launcher plan` wrote, not a link to one). A linked logs/ would take the run's logs elsewhere."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return None  # absent (a new run), or not a folder: writing the plan reports it
    logs = run_dir / "logs"
    if logs.is_symlink():
        return f"holds logs, a symbolic link (to {os.path.realpath(logs)}): the run's logs would be written there"
    if set(names) <= BEFORE_PLAN:
        return None
    plan = run_dir / "plan.json"
    try:
        data = json.loads(read_small(plan, limit=1 << 24) or "null") if not plan.is_symlink() else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        data = None
    if isinstance(data, dict) and data.keys() >= PLAN_KEYS:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"is not empty and is not a launcher run directory (it holds {shown}, and no plan.json `launcher plan` wrote)"
