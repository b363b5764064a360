"""Files a run writes into its directory, written so that nothing planted there can redirect them: each
is written beside its name and renamed into place, so a symbolic link (or a FIFO) at that name is
replaced, never followed or opened. No torch here: `launcher plan`, `launcher run` and the ranks use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def replace_file(path: Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to a new file beside `path` (O_EXCL: never an existing file or link), then rename
    it over `path`, with `mode` (default: what the umask gives a new file, as open() would). A file
    being replaced keeps its old content if the write fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
