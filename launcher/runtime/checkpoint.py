"""Sharded checkpoints (torch.distributed.checkpoint) with a manifest, a COMPLETE marker and retention.

Layout: checkpoints/step-NNNNNNNN/{model_optim/ (DCP), rng/rank-R.pt, manifest.json, COMPLETE} and a
`latest` symlink moved by atomic rename once COMPLETE exists. A checkpoint without COMPLETE, or
whose files do not match the sizes its manifest recorded, is never resumed from. Retention never
deletes the newest complete checkpoint. DeepSpeed's own format goes through engine.py with the
same layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from launcher import __version__

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from as asked; one line for the user."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE, MANIFEST)
    }


@dataclass
class Saver:
    """Saves on every rank; rank 0 finalises (manifest, COMPLETE, latest, retention)."""

    root: Path
    rank: int
    keep_last: int
    async_save: bool = False
    group: Any = None  # a separate gloo group: async writes must not share the training group
    _pending: Any = None
    _pending_finish: Any = None

    def begin(self, step: int) -> Path:
        """A fresh step folder (an earlier, never completed attempt at this step is removed) with
        this rank's RNG state in it; every rank returns once the folder exists."""
        folder = step_dir(self.root, step)
        self.wait()  # one save in flight at a time
        if self.rank == 0:
            if folder.exists():
                shutil.rmtree(folder)
            (folder / "rng").mkdir(parents=True)
        dist.barrier()
        torch.save(rng_state(), folder / "rng" / f"rank-{self.rank:05d}.pt")
        return folder

    def save(self, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any]) -> Path:
        folder = self.begin(manifest["step"])
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            self._pending = dcp.async_save(state, checkpoint_id=str(folder / "model_optim"), process_group=self.group)
            self._pending_finish = (folder, manifest)
        else:
            dcp.save(state, checkpoint_id=str(folder / "model_optim"))
            self._finish(folder, manifest)
        return folder

    def poll(self) -> bool:
        """True when no save is in flight (finalising one that just ended on every rank)."""
        if self._pending is None:
            return True
        done = torch.tensor([1.0 if self._pending.done() else 0.0])
        dist.all_reduce(done, group=self.group)
        if int(done.item()) == dist.get_world_size(self.group):
            self.wait()
            return True
        return False

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            folder, manifest = self._pending_finish
            self._finish(folder, manifest)

    def _finish(self, folder: Path, manifest: dict[str, Any]) -> None:
        # Test hook: hold every rank between writing its shard and the COMPLETE marker, so a test
        # can kill a rank in the middle of a save.
        if os.environ.get("LAUNCHER_TEST_PAUSE_BEFORE_COMPLETE") == str(manifest["step"]):
            time.sleep(3600)
        dist.barrier(group=self.group)  # every rank's shard is on disk
        if self.rank == 0:
            record = {**manifest, "launcher_version": __version__, "files": file_sizes(folder)}
            _fsync_write(folder / MANIFEST, json.dumps(record, indent=2) + "\n")
            _fsync_write(folder / COMPLETE, "")
            link = self.root / "latest.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(folder.name)
            os.replace(link, self.root / "latest")
            retain(self.root, self.keep_last)
        dist.barrier(group=self.group)


def is_complete(folder: Path) -> tuple[bool, str]:
    """(usable, reason if not): COMPLETE present, manifest readable, every file at its recorded size."""
    if not (folder / COMPLETE).exists():
        return False, "no COMPLETE marker (the save did not finish)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, "manifest.json missing or unreadable"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return False, f"{name} is missing"
        if path.stat().st_size != size:
            return False, f"{name} has {path.stat().st_size} bytes, the manifest recorded {size} (truncated?)"
    return True, ""


def checkpoints(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resume(root: Path, resume: str, warn: bool = True) -> Path | None:
    """The checkpoint to resume from: `never` → None; a path → it (must be complete); `auto` → newest complete."""
    if resume == "never":
        return None
    if resume != "auto":
        folder = Path(resume)
        ok, reason = is_complete(folder)
        if not ok:
            raise CheckpointError(f"checkpoint.resume: {folder} cannot be resumed from: {reason}")
        return folder
    for folder in checkpoints(root):
        ok, reason = is_complete(folder)
        if ok:
            return folder
        if warn:
            warnings.warn(f"skipping checkpoint {folder}: {reason}", stacklevel=2)
    return None


def load(folder: Path, model: torch.nn.Module, optimizer: Any, rank: int) -> dict[str, Any]:
    """Load model and optimizer (resharded by DCP to this world size) and this rank's RNG state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "model_optim"))  # fills in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng_file = folder / "rng" / f"rank-{rank:05d}.pt"
    if rng_file.exists():  # a rank that did not exist at save time keeps its seeded state
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / MANIFEST).read_text())


def retain(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and older incomplete ones."""
    complete = [p for p in checkpoints(root) if is_complete(p)[0]]
    if not complete:
        return
    keep = set(complete[: max(keep_last, 1)])
    newest = complete[0]
    for folder in checkpoints(root):
        if folder in keep:
            continue
        if folder in complete or folder.name < newest.name:
            shutil.rmtree(folder, ignore_errors=True)


def compare_manifest(saved: dict[str, Any], now: dict[str, Any], allow_mismatch: bool) -> list[str]:
    """What changed since the checkpoint that makes resuming inexact; raises unless allowed."""
    changed = [
        f"{key}: {saved.get(key)!r} -> {now[key]!r}"
        for key in ("data_fingerprint", "global_batch_size", "seed", "max_seq_len", "method", "backend")
        if key in saved and saved.get(key) != now[key]
    ]
    if changed and not allow_mismatch:
        raise CheckpointError(
            "checkpoint.resume: the run changed since the checkpoint (" + "; ".join(changed) + "); "
            "restore the settings, start fresh with checkpoint.resume=never, or set checkpoint.allow_mismatch=true"
        )
    return changed
