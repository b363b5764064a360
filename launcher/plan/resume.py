"""Which checkpoint a run resumes from, and whether it may: decided from JSON and file sizes only.

No torch here: `launcher plan`/`run` call `check_resume` before writing anything, so a run that
would be refused for changed settings is refused before its plan.json or config.yaml is touched;
the ranks use the same functions (rank 0 decides, see runtime/__main__.py). A checkpoint counts
once its COMPLETE marker exists and every file has the size (and, when verified, the CRC-32) its
manifest recorded.
"""

from __future__ import annotations

import json
import stat
import zlib
from pathlib import Path
from typing import Any

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import RunConfig

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024**2
_CHUNK = 8 * 1024**2

# Settings that make a resume inexact when they change; `data_fingerprint` is known only to the ranks.
COMPARED = ("data_fingerprint", "global_batch_size", "seed", "max_seq_len", "method", "backend")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from as asked; one line for the user."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def checkpoints(root: Path) -> list[Path]:
    """Step folders, newest first."""
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def crc32(path: Path) -> int:
    value = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json as data; CheckpointError if missing, too large or not a JSON object."""
    path = folder / MANIFEST
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise CheckpointError(f"{path} is not a regular file (a FIFO, a device or a folder)")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is missing or unreadable") from None
    if not isinstance(data, dict) or not isinstance(data.get("step"), int) or not isinstance(data.get("files", {}), dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest")
    return data


def is_complete(folder: Path, verify: bool = False) -> tuple[bool, str]:
    """(usable, reason if not): COMPLETE present, manifest readable, every file at its recorded
    size, and with `verify` at its recorded CRC-32 (same-size corruption)."""
    if not (folder / COMPLETE).exists():
        return False, "no COMPLETE marker (the save did not finish)"
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return False, "manifest.json missing or unreadable"
    sums = manifest.get("checksums", {})
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return False, f"the manifest names {name}, outside the checkpoint (refused)"
        if not path.is_file():
            return False, f"{name} is missing"
        if path.stat().st_size != size:
            return False, f"{name} has {path.stat().st_size} bytes, the manifest recorded {size} (truncated?)"
        if verify and name in sums and crc32(path) != sums[name]:
            return False, f"{name} does not match its checksum (corrupted)"
    return True, ""


def resume_candidates(root: Path, resume: str) -> tuple[list[Path], list[str]]:
    """Checkpoints to try, best first, and a line per skipped one. `never` → none; a path → it
    (must be complete); `auto` → every complete one, newest first. Raises CheckpointError when
    `auto` finds step folders but none is complete: a silent restart would discard the run."""
    if resume == "never":
        return [], []
    if resume != "auto":
        folder = Path(resume)
        ok, reason = is_complete(folder)
        if not ok:
            raise CheckpointError(f"checkpoint.resume: {folder} cannot be resumed from: {reason}")
        return [folder], []
    found, skipped = [], []
    folders = checkpoints(root)
    for folder in folders:
        ok, reason = is_complete(folder)
        if ok:
            found.append(folder)
        else:
            skipped.append(f"skipping checkpoint {folder}: {reason}")
    if folders and not found:
        raise CheckpointError(
            f"checkpoint.resume: auto, but none of the {len(folders)} checkpoint folder(s) in {root} is complete "
            f"({skipped[0].split(': ', 1)[1]}); delete them to start over, or start a fresh run in another directory (--out DIR)"
        )
    return found, skipped


def find_resume(root: Path, resume: str, warn: bool = True) -> Path | None:
    """The newest usable checkpoint (see `resume_candidates`), or None to start at step 0."""
    import warnings

    found, skipped = resume_candidates(root, resume)
    if warn:
        for line in skipped:
            warnings.warn(line, stacklevel=2)
    return found[0] if found else None


def refuse_start_over(root: Path, resume: str) -> None:
    """`never` on top of earlier checkpoints would mix two runs' checkpoints (and retention could
    delete the new ones)."""
    if resume == "never" and checkpoints(root):
        raise CheckpointError(
            f"checkpoint.resume: never, but {root} holds an earlier run's checkpoints; "
            "resume them (checkpoint.resume=auto), write elsewhere (--out DIR or run.output_dir), or delete them"
        )


def settings(cfg: RunConfig) -> dict[str, Any]:
    """The compared settings known from the config alone."""
    return {
        "global_batch_size": cfg.train.global_batch_size,
        "seed": cfg.run.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "method": cfg.method.name,
        "backend": cfg.parallel.backend,
    }


def compare_manifest(saved: dict[str, Any], now: dict[str, Any], allow_mismatch: bool) -> list[str]:
    """What changed since the checkpoint that makes resuming inexact; raises unless allowed."""
    changed = [
        f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in COMPARED if key in saved and key in now and saved.get(key) != now[key]
    ]
    if changed and not allow_mismatch:
        raise CheckpointError(
            "checkpoint.resume: the run changed since the checkpoint (" + "; ".join(changed) + "); "
            "restore the settings, set checkpoint.allow_mismatch=true, or start a fresh run in another directory (--out DIR)"
        )
    return changed


def schedule_note(saved: dict[str, Any], cfg: RunConfig) -> str | None:
    """A changed train.max_steps reshapes the learning-rate schedule: the rate jumps at once."""
    before = saved.get("max_steps")
    if isinstance(before, int) and cfg.train.max_steps is not None and before != cfg.train.max_steps:
        return (
            f"train.max_steps changed {before} -> {cfg.train.max_steps} since the checkpoint: the {cfg.optim.scheduler} "
            f"learning-rate schedule is recomputed over the new length, so the rate jumps at step {saved['step']}; "
            f"to keep the old schedule, resume with train.max_steps={before}"
        )
    return None


def check_resume(cfg: RunConfig, run_dir: str, data_fingerprint: str | None = None) -> dict[str, Any] | None:
    """Everything the ranks would refuse about resuming, decided before anything is written;
    returns the manifest of the checkpoint the run will resume from (None: it starts at step 0).
    The data fingerprint is known once the data is prepared: `run` passes it, `plan` cannot."""
    root = Path(run_dir) / "checkpoints"
    now = settings(cfg) if data_fingerprint is None else {**settings(cfg), "data_fingerprint": data_fingerprint}
    try:
        refuse_start_over(root, cfg.checkpoint.resume)
        found, _ = resume_candidates(root, cfg.checkpoint.resume)
        if not found:
            return None
        saved = read_manifest(found[0])
        compare_manifest(saved, now, cfg.checkpoint.allow_mismatch)
        return saved
    except CheckpointError as exc:
        key, _, rest = str(exc).partition(": ")
        what, _, fix = rest.rpartition("; ")
        raise ConfigError([Problem(key, what, fix)]) from None
