"""Sharded checkpoints (torch.distributed.checkpoint) with a manifest, a COMPLETE marker and retention.

Layout: checkpoints/step-NNNNNNNN/{model_optim/ (DCP), rng/rank-R.json, manifest.json, COMPLETE} and a
`latest` symlink moved by atomic rename once COMPLETE exists. A checkpoint without COMPLETE, or
whose files do not match the sizes and CRC-32s its manifest recorded, is never resumed from.
Retention never deletes the newest complete checkpoint. DeepSpeed's own format goes through
zero.py with the same layout.

Checkpoints are data, never code: RNG states are JSON, DCP's pickled `.metadata` is read by an
unpickler that builds only DCP's own metadata classes, and every other object is read with
`torch.load(weights_only=True)`. A file planted in a copied run directory cannot run anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from launcher import __version__
from launcher.config.errors import ConfigError
from launcher.plan.resume import (  # noqa: F401  (the torch-free half, re-exported for the runtime)
    COMPLETE,
    MANIFEST,
    CheckpointError,
    checkpoints,
    compare_manifest,
    crc32,
    find_resume,
    is_complete,
    read_manifest,
    refuse_start_over,
    resume_candidates,
    step_dir,
)
from launcher.runtime.state.safe_state import SafeReader, load_rng, refuse_foreign_pickles, safe_load, save_rng  # noqa: F401  (re-exported)

# DeepSpeed's own folder inside a step folder (its save_checkpoint tag): written by parallel/zero.py,
# read there on resume and by export.py.
DEEPSPEED_TAG = "deepspeed"


def _fsync_write(path: Path, text: str) -> None:
    from launcher.runfiles import replace_file

    replace_file(path, text, fsync=True)


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE, MANIFEST)
    }


def file_checksums(folder: Path, names: list[str]) -> dict[str, int]:
    return {name: crc32(folder / name) for name in names}


def _disk_full(folder: Path) -> str:
    """'' unless the filesystem holding `folder` has less room than the last complete checkpoint
    took (1 MiB when there is none yet); then a few words saying how much is free."""
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        return ""
    latest = folder.parent / "latest"
    last = latest.resolve() if latest.is_symlink() else None
    needed = sum(file_sizes(last).values()) if last is not None and last.is_dir() else 0
    if free >= max(needed, 1 << 20):
        return ""
    return f"{free / 2**20:.1f} MiB free on {folder.parent}, the last checkpoint took {needed / 2**20:.1f} MiB"


@contextlib.contextmanager
def save_errors(folder: Path, rank: int) -> Iterator[None]:
    """ENOSPC, EROFS, EACCES while saving (raised here or inside DCP on any rank) → one
    CheckpointError line naming the folder; the last complete checkpoint stays as it was, and the
    partial folder is removed so that the logs and the exit code still fit on a full disk."""
    try:
        yield
    except (OSError, CheckpointException) as exc:
        full = _disk_full(folder)  # before the partial folder is removed: that frees what it took
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        cause: BaseException = exc
        for failure in getattr(exc, "failures", {}).values():  # DCP: rank -> (exception, traceback)
            cause = failure[0] if isinstance(failure, tuple) else failure
        reason = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[0][:200]
        if full and "No space left" not in reason:
            # torch's zip writer reports a short write as "unexpected pos ...", not as ENOSPC
            reason = f"No space left on device: {full}; the writer said: {reason}"
        where = getattr(cause, "filename", None) or folder
        latest = folder.parent / "latest"
        kept = (
            f"the last complete checkpoint ({os.readlink(latest)}) is kept" if latest.is_symlink() else "no complete checkpoint exists yet"
        )
        raise CheckpointError(
            f"{where}: cannot save the checkpoint ({reason}); {kept}; free some space, then run again to resume"
        ) from None


class _Held:
    """A save future that says it is still running until someone waits for it (LAUNCHER_TEST_HOLD_ASYNC_SAVE)."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return False

    def result(self) -> Any:
        return self.future.result()


def _test_slow_writer(path: Path, rank: int) -> Any:
    """LAUNCHER_TEST_SLOW_ASYNC_WRITE=RANK:SECONDS (a test hook): that rank's asynchronous write waits
    first, in DCP's background thread, as a slow file system would; None (DCP's own writer) otherwise."""
    spec = os.environ.get("LAUNCHER_TEST_SLOW_ASYNC_WRITE", "")
    if not spec or spec.split(":")[0] != str(rank):
        return None
    seconds = float(spec.split(":")[1])
    from torch.distributed.checkpoint import FileSystemWriter

    class SlowWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            time.sleep(seconds)
            return super().write_data(plan, planner)

    return SlowWriter(str(path))


@dataclass
class Saver:
    """Saves on every rank; rank 0 finalises (manifest, COMPLETE, latest, retention)."""

    root: Path
    rank: int
    keep_last: int
    async_save: bool = False
    group: Any = None  # a separate gloo group: async writes must not share the training group
    # The step boundary's "is the save done everywhere?" all-reduce: a gloo group of its own. DCP's
    # background thread runs collectives on `group` (plan and final gathers) while the training thread
    # polls; on one group the ranks would pair a poll with a gather and hang (issue 24).
    poll_group: Any = None
    trainable_only: bool = False  # adapter methods: the frozen base is the model's own files, not saved again
    _pending: Any = None
    _pending_finish: Any = None
    _started: float = 0.0  # when the save in progress began: its time is printed and recorded

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
        save_rng(folder, self.rank)
        return folder

    def save(self, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any]) -> Path:
        folder = step_dir(self.root, manifest["step"])
        with save_errors(folder, self.rank):
            folder = self.begin(manifest["step"])
            self._started = time.monotonic()
            model_sd, optim_sd = get_state_dict(model, optimizer, options=state_options(self.trainable_only))
            model_sd = trainable_entries(model, model_sd) if self.trainable_only else model_sd
            state = {"model": model_sd, "optim": optim_sd}
            if self.async_save:
                writer = _test_slow_writer(folder / "model_optim", self.rank)
                self._pending = dcp.async_save(
                    state, checkpoint_id=str(folder / "model_optim"), process_group=self.group, storage_writer=writer
                )
                if os.environ.get("LAUNCHER_TEST_HOLD_ASYNC_SAVE"):  # test hook: in flight until waited for
                    self._pending = _Held(self._pending)
                self._pending_finish = (folder, manifest)
            else:
                dcp.save(state, checkpoint_id=str(folder / "model_optim"))
                self._finish(folder, manifest)
        return folder

    def in_flight(self) -> Path | None:
        """The folder an asynchronous save is still writing (after poll(), the same on every rank)."""
        return self._pending_finish[0] if self._pending is not None else None

    def poll(self) -> bool:
        """True when no save is in flight (finalising one that just ended on every rank)."""
        if self._pending is None:
            return True
        done = torch.tensor([1.0 if self._pending.done() else 0.0])
        dist.all_reduce(done, group=self.poll_group)
        if int(done.item()) == dist.get_world_size(self.poll_group):
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
            sizes = file_sizes(folder)
            took = time.monotonic() - self._started  # what cluster.signal_seconds must cover (plan/budget.py)
            record = {**manifest, "launcher_version": __version__, "files": sizes, "checksums": file_checksums(folder, list(sizes))}
            record["save_seconds"] = round(took, 3)
            _fsync_write(folder / MANIFEST, json.dumps(record, indent=2) + "\n")
            _fsync_write(folder / COMPLETE, "")
            link = self.root / "latest.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(folder.name)
            os.replace(link, self.root / "latest")
            retain(self.root, self.keep_last)
            size = sum(sizes.values())
            print(f"launcher: checkpoint {folder.name} written: {size / 1e6:.1f} MB in {took:.1f} s", flush=True)
        dist.barrier(group=self.group)


def state_options(trainable_only: bool) -> StateDictOptions:
    """Full methods save everything; adapter methods only what trains (LoRA, a classifier's head):
    at 70B QLoRA that is ~2.5 GB a save instead of ~40 GB, and resume stays exact because the frozen
    base is loaded from the model's own files before the checkpoint."""
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def trainable_entries(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """Only the trainable parameters: DCP's ignore_frozen_params still keeps a frozen weight under
    its second name when it is tied (GPT-2's lm_head = wte), a vocabulary-sized matrix per save."""
    trainable = {name.removeprefix("module.") for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}
    return {key: value for key, value in model_sd.items() if key in trainable}


def load(folder: Path, model: torch.nn.Module, optimizer: Any, rank: int, trainable_only: bool = False) -> dict[str, Any]:
    """Load model and optimizer (resharded by DCP to this world size) and this rank's RNG state."""
    options = state_options(trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    model_sd = trainable_entries(model, model_sd) if trainable_only else model_sd
    safe_load({"model": model_sd, "optim": optim_sd}, folder / "model_optim")  # fills in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    load_rng(folder, rank)
    return read_manifest(folder)


def best_checkpoint(newest: Path) -> Path | None:
    """The checkpoint early stopping recorded as best, from the newest manifest (None without early stopping)."""
    try:
        step = json.loads((newest / MANIFEST).read_text()).get("early_stopping", {}).get("best_step")
    except (OSError, ValueError):
        return None
    return step_dir(newest.parent, int(step)) if isinstance(step, int) else None


def retain(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and older incomplete ones."""
    complete = [p for p in checkpoints(root) if is_complete(p)[0]]
    if not complete:
        return
    keep = set(complete[: max(keep_last, 1)])
    newest = complete[0]
    best = best_checkpoint(newest)
    if best is not None:
        keep.add(best)  # early stopping's best evaluation is never deleted
    for folder in checkpoints(root):
        if folder in keep:
            continue
        if folder in complete or folder.name < newest.name:
            shutil.rmtree(folder, ignore_errors=True)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (objects travel between our own processes only)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide(root: Path, resume: str, info: Any) -> list[Path]:
    """Rank 0 takes the run directory's lock (unless `launcher run` above it holds it) and lists the
    checkpoints to try, best first; every rank gets the same list or raises the same error."""
    from launcher.runlock import RunDirBusy, acquire

    answer: dict[str, Any] = {}
    if info.is_main:
        try:
            acquire(root.parent)
            # A placeholder with content: on a full disk, the final exit code reuses its block.
            (root.parent / "logs").mkdir(exist_ok=True)
            from launcher.runfiles import open_append

            try:
                with open_append(root.parent / "logs" / "exit_code", truncate=True) as handle:
                    handle.write(" \n")
            except ConfigError as exc:
                raise CheckpointError(str(exc).removeprefix("error: ")) from None
            refuse_start_over(root, resume)
            found, skipped = resume_candidates(root, resume)
            for line in skipped:
                print(f"warning: {line}", file=sys.stderr, flush=True)
            answer = {"candidates": [str(p) for p in found]}
        except CheckpointError as exc:
            answer = {"error": str(exc), "busy": isinstance(exc, RunDirBusy)}
    answer = _broadcast(answer)
    if "error" in answer:
        raise (RunDirBusy if answer["busy"] else CheckpointError)(answer["error"])
    return [Path(p) for p in answer["candidates"]]


def load_first(candidates: list[Path], load_one: Any, info: Any) -> tuple[Path, dict[str, Any]] | None:
    """Load the first candidate that verifies (CRC-32, rank 0) and loads on every rank; a bad one
    falls back to the next with one warning line. None when there is nothing to resume."""
    for index, folder in enumerate(candidates):
        reason = is_complete(folder, verify=True)[1] if info.is_main else ""
        reason = _broadcast(reason)
        saved: dict[str, Any] = {}
        if not reason:
            try:
                saved = load_one(folder, info.rank)
                failed = 0.0
            except (Exception, CheckpointException) as exc:  # DCP's is a BaseException; agreed below, then fall back
                failed, reason = 1.0, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            flag = torch.tensor([failed], device=info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 0:
                return folder, saved
            reason = reason or "it failed to load on another rank"
        if info.is_main:
            after = f"falling back to {candidates[index + 1]}" if index + 1 < len(candidates) else "no older complete checkpoint is left"
            print(f"warning: checkpoint {folder} cannot be loaded ({reason}); {after}", file=sys.stderr, flush=True)
    if candidates:
        raise CheckpointError(
            f"checkpoint.resume: none of the {len(candidates)} complete checkpoint(s) could be loaded (see the warnings above); "
            "delete them to start over, or start a fresh run in another directory (--out DIR)"
        )
    return None


def cut_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl records up to `step` only: steps replayed after a resume (or a fallback
    to an older checkpoint) are logged again, never twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    _fsync_write(path, "".join(kept))


def write_exit_code(logs: Path, code: int) -> None:
    """logs/exit_code, rewritten in place: on a full disk the old file's block is reused."""
    from launcher.runfiles import open_append

    try:
        logs.mkdir(exist_ok=True)
        with open_append(logs / "exit_code", truncate=True) as handle:  # never through a planted link
            handle.write(f"{code}\n")
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr, flush=True)
    except OSError as exc:
        print(f"error: {logs / 'exit_code'}: cannot write the exit code {code} ({exc.strerror})", file=sys.stderr, flush=True)
