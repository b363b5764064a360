"""Checkpoint state that is data, never code.

RNG states are JSON. DCP's `.metadata` is a pickle: it is read by an unpickler that builds only
DCP's own metadata classes, torch sizes and dtypes; every other non-tensor object in a checkpoint
(optimizer hyper-parameters, step counters) is read with `torch.load(weights_only=True)`. A file
planted in a copied run directory cannot run anything; at worst the load fails and the run falls
back to an older checkpoint (checkpoint.load_first).
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from launcher.plan.resume import CheckpointError


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able data."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank-{rank:05d}.json"


def save_rng(folder: Path, rank: int) -> None:
    rng_file(folder, rank).write_text(json.dumps(rng_state()))


def load_rng(folder: Path, rank: int) -> None:
    """This rank's RNG state; a rank that did not exist at save time keeps its seeded state."""
    path = rng_file(folder, rank)
    if path.exists():
        try:
            set_rng_state(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a valid RNG state ({exc})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes, and nothing else."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("pathlib", "PosixPath"),
        ("pathlib", "Path"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata":
            found = getattr(dcp_metadata, name, None)
            if isinstance(found, type) or name == "_MEM_FORMAT_ENCODING":
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` (a pickle) cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        if path.exists() and not path.is_file():  # a FIFO would block the read forever
            raise CheckpointError(f"{path} is not a regular file (a FIFO, a device or a folder)")
        try:
            with path.open("rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise CheckpointError(f"{path} is not DCP metadata ({exc})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{path} is not DCP metadata")
        storage = getattr(metadata, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters, step counters) read with weights_only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def safe_load(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """dcp.load that reads data only (see SafeReader, SafePlanner)."""
    SafeReader(str(path)).read_metadata()  # a bad .metadata is one clear line, before DCP's own logging
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=no_dist)


class _Stub:
    """Stands in for every object while a pickle is scanned: nothing real is built or called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    """Records the globals a pickle refers to; every one resolves to a stub."""

    def __init__(self, handle: Any) -> None:
        super().__init__(handle)
        self.globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.globals.add(f"{module}.{name}")
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return _Stub()


def pickle_globals(path: Path) -> set[str]:
    """The globals referenced by a torch.save file (zip format) or a plain pickle, found without
    building anything."""
    import zipfile

    found: set[str] = set()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".pkl"):
                    with archive.open(name) as handle:
                        scanner = _ScanUnpickler(handle)
                        scanner.load()
                        found |= scanner.globals
        return found
    with path.open("rb") as handle:  # a plain pickle (torch's zip format is the only other one accepted)
        scanner = _ScanUnpickler(handle)
        scanner.load()
    return scanner.globals


def refuse_foreign_pickles(folder: Path, allowed: frozenset[str]) -> None:
    """Before a library loads its own pickled files with `weights_only=False` (DeepSpeed): every
    global they refer to must be torch's weights-only set or `allowed`; else CheckpointError."""
    from torch._weights_only_unpickler import _get_allowed_globals

    safe = set(_get_allowed_globals()) | allowed
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".pkl")):
        try:
            foreign = sorted(pickle_globals(path) - safe)
        except Exception as exc:  # not a pickle at all, cut short, ...: no library should be handed it
            raise CheckpointError(f"{path} is not a readable checkpoint file ({type(exc).__name__})") from None
        if foreign:
            raise CheckpointError(f"{path} refers to {foreign[0]}, which no checkpoint needs (a planted pickle?)")
