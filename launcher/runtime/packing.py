"""Tokenised data on disk, prepared once, memory-mapped by every rank.

`prepare_data` runs before the distributed job (`launcher prepare`, `launcher run`, and the sbatch
script) or, if that was skipped, on the first rank to take the file lock — never while other ranks
wait inside a collective. The folder is built under a unique temporary name and renamed into place
with its COMPLETE marker inside, so a reader on a shared file system sees all of it or nothing,
even where the lock is not honoured. Rows hold several documents when packing is on: position ids
restart at each document, which is what the attention path uses to keep documents apart.

The global sample order depends only on the seed and the number of rows, never on the world size:
sample k is row perm_epoch[k % rows] of epoch k // rows, so a resumed run at another world size
continues with the same rows.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from launcher.config.schema import DataSection
from launcher.runtime.data import IGNORE_INDEX, DataError, fingerprint, source_files

# Bump when the on-disk rows change (2: no length sort; 3: classification, shifted label counts;
# 4: Arrow pipeline, mixes, per-document sources, report per data set).
CACHE_VERSION = 4
SPLITS = ("train", "val")
_CHUNK_DOCS = 8192  # documents gathered per write: bounds the memory of a write


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [rows, length] int64
    labels: np.ndarray
    position_ids: np.ndarray
    label_tokens: int  # tokens with a label, the loss denominator's share of this batch
    pad_tokens: int
    rows: list[int] | None = None  # the row indices (-1: an empty row), for evaluation records
    classes: np.ndarray | None = None  # [rows] class ids (classification; IGNORE_INDEX for empty rows)
    lengths: np.ndarray | None = None  # [rows] real tokens per row (the rest is padding)


def _file_part(path: str) -> str:
    return fingerprint(source_files(path)) if path else ""


def cache_key(data: DataSection, data_source: str, tokenizer_dir: Path, seed: int, task: str = "causal_lm") -> str:
    tokenizer_files = sorted(p for p in tokenizer_dir.glob("tokenizer*") if p.is_file()) + sorted(tokenizer_dir.glob("*.jinja"))
    template_file = Path(data.chat_template) if data.chat_template and "{" not in data.chat_template else None
    parts = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in asdict(data).items() if k not in ("num_proc", "cache_dir")},
        "source": _file_part(data_source) or data_source,
        "datasets": [_file_part(d.path) or d.path for d in data.datasets],
        "val_source": _file_part(data.val_path),
        "chat_template": fingerprint([template_file]) if template_file is not None and template_file.is_file() else "",
        "tokenizer": fingerprint(tokenizer_files),
        "seed": seed,
        "task": task,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(data: DataSection, data_source: str, tokenizer_dir: Path, cache_root: Path, seed: int, task: str = "causal_lm") -> Path:
    """Build (or find) the cache folder for these settings; returns it. Safe to call from every rank."""
    from dataclasses import replace

    from launcher.runtime.data.prepare import build
    from launcher.runtime.tiny import shipped_data

    folder = cache_root / cache_key(data, data_source, tokenizer_dir, seed, task)
    if (folder / "COMPLETE").exists():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "COMPLETE").exists():
            return folder
        tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            named = data if shipped_data(data.path) is not None else replace(data, path=data_source)  # report the name given
            meta = build(named, task, tokenizer_dir, seed, tmp, lambda p: shipped_data(p) or p)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / "COMPLETE").write_text("")
            try:
                os.replace(tmp, folder)
            except OSError:  # another host built it meanwhile (a lock the file system ignored): keep theirs
                if not (folder / "COMPLETE").exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pack_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Best fit, in the (already shuffled) order given: each document goes into the fullest row
    that still has room; returns each document's row. Not sorted by length first: that would fill
    rows with documents of one length (often one task), and batches of such rows are far from a
    random sample. Rows are kept in buckets by room left (at most `capacity` of them), so a
    document costs a bisect over the distinct rooms, not over the rows."""
    row_of = np.empty(len(lengths), dtype=np.int64)
    rooms: list[int] = []  # distinct rooms left that some row has, sorted
    buckets: dict[int, list[int]] = {}
    rows = 0
    for start in range(0, len(lengths), 1 << 16):
        for i, size in enumerate(lengths[start : start + (1 << 16)].tolist(), start):
            at = bisect.bisect_left(rooms, size)
            if at < len(rooms):
                room = rooms[at]
                bucket = buckets[room]
                row = bucket.pop()
                if not bucket:
                    del rooms[at], buckets[room]
            else:
                room, row = capacity, rows
                rows += 1
            row_of[i] = row
            left = room - size
            if left > 0:
                if left not in buckets:
                    bisect.insort(rooms, left)
                    buckets[left] = []
                buckets[left].append(row)
    return row_of


@dataclass
class DocTable:
    """Every kept document of one split, its tokens in one flat memory-mapped array."""

    ids: np.ndarray
    labels: np.ndarray
    start: np.ndarray  # [documents] int64 offset into ids/labels
    length: np.ndarray
    targets: np.ndarray  # labels at index >= 1 (the loss's shift rule)
    classes: np.ndarray  # class id per document (-100 when not classification)
    source: np.ndarray  # data set index per document
    first: list[int]  # the first document of each data set

    @property
    def count(self) -> int:
        return len(self.start)

    @staticmethod
    def remove(work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)


def write_flat(parts: list[Any], folder: Path, labels: list[str], where: str) -> DocTable:
    """Copy the kept documents' tokens from the parts' Arrow tables into two flat memmaps."""
    import pyarrow as pa
    import pyarrow.compute as pc

    folder.mkdir(parents=True)
    lengths = [np.asarray(p.tokens.data.column("length").to_numpy())[p.keep].astype(np.int64) for p in parts]
    total = int(sum(int(x.sum()) for x in lengths))
    ids = np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=np.int32, shape=(max(total, 1),))
    labs = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int32, shape=(max(total, 1),))
    classes, at = [], 0
    for part in parts:
        for start in range(0, len(part.keep), 1 << 14):
            table = part.tokens.data.slice(start, 1 << 14).filter(pa.array(part.keep[start : start + (1 << 14)]))
            flat_ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
            n = len(flat_ids)
            ids[at : at + n] = flat_ids
            labs[at : at + n] = table.column("labels").combine_chunks().flatten().to_numpy()
            at += n
            if labels:
                found = pc.index_in(table.column("label"), value_set=pa.array(labels)).to_numpy(zero_copy_only=False)
                if np.isnan(found.astype(float)).any():
                    unknown = sorted(set(table.column("label").to_pylist()) - set(labels))[:3]
                    raise DataError(f"{where}: validation labels {unknown} never occur in the training rows; check data.label_field")
                classes.append(found.astype(np.int64))
    length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(length) else length
    counts = [len(x) for x in lengths]
    targets = np.concatenate([np.asarray(p.tokens.data.column("targets").to_numpy())[p.keep] for p in parts]).astype(np.int64)
    source = np.repeat(np.arange(len(parts)), counts).astype(np.int16)
    cls = np.concatenate(classes) if classes else np.full(len(length), IGNORE_INDEX, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist() if counts else []
    return DocTable(ids, labs, starts, length, targets, cls, source, first)


def write_rows(docs: DocTable, order: np.ndarray, capacity: int, prefix: Path, classification: bool) -> dict[str, int]:
    """Documents in `order` → rows (packed to `capacity`, or one each when 0) written as memmaps."""
    lengths = docs.length[order]
    row_of = pack_lengths(lengths, capacity) if capacity else np.arange(len(order), dtype=np.int64)
    placed = order[np.argsort(row_of, kind="stable")]  # row by row; inside a row, in shuffled order
    rows = int(row_of.max()) + 1 if len(row_of) else 0
    row_tokens = np.bincount(row_of, weights=lengths, minlength=rows).astype(np.int64)
    total = int(row_tokens.sum())
    prefix.mkdir()
    out = {
        name: np.lib.format.open_memmap(prefix / f"{name}.npy", mode="w+", dtype=np.int32, shape=(max(total, 1),))
        for name in ("input_ids", "labels", "position_ids")
    }
    at = 0
    for chunk in range(0, len(placed), _CHUNK_DOCS):
        doc = placed[chunk : chunk + _CHUNK_DOCS]
        size = docs.length[doc]
        n = int(size.sum())
        local = np.arange(n, dtype=np.int64)
        doc_first = np.repeat(np.cumsum(size) - size, size)
        src = np.repeat(docs.start[doc], size) + local - doc_first
        out["input_ids"][at : at + n] = docs.ids[src]
        out["labels"][at : at + n] = docs.labels[src]
        out["position_ids"][at : at + n] = local - doc_first
        at += n
    for array in out.values():
        array.flush()
    np.save(prefix / "offsets.npy", np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int64))
    label_tokens = (
        np.ones(rows, dtype=np.int64)
        if classification
        else np.bincount(row_of, weights=docs.targets[order], minlength=rows).astype(np.int64)
    )
    np.save(prefix / "label_tokens.npy", label_tokens)
    per_row = np.bincount(row_of, minlength=rows)
    np.save(prefix / "doc_offsets.npy", np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64))
    np.save(prefix / "doc_sources.npy", docs.source[placed])
    if classification:
        np.save(prefix / "classes.npy", docs.classes[placed])
    return {"rows": rows, "documents": len(order), "tokens": total}


class TokenData:
    """One split of a prepared cache, memory-mapped."""

    def __init__(self, folder: Path, split: str) -> None:
        part = folder / split
        self.input_ids = np.load(part / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(part / "labels.npy", mmap_mode="r")
        self.position_ids = np.load(part / "position_ids.npy", mmap_mode="r")
        self.offsets = np.load(part / "offsets.npy")
        self.label_tokens = np.load(part / "label_tokens.npy")
        self.classes = np.load(part / "classes.npy") if (part / "classes.npy").exists() else None
        self.doc_offsets = np.load(part / "doc_offsets.npy")  # row -> its documents in doc_sources
        self.doc_sources = np.load(part / "doc_sources.npy", mmap_mode="r")  # data set index per document
        self.pad_id = int(json.loads((folder / "meta.json").read_text())["pad_token_id"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sources(self, rows: list[int]) -> np.ndarray:
        """Documents per data set in these rows (the mix a run actually trained on)."""
        found = [self.doc_sources[self.doc_offsets[r] : self.doc_offsets[r + 1]] for r in rows if r >= 0]
        return (
            np.bincount(np.concatenate(found).astype(np.int64), minlength=int(self.doc_sources.max(initial=0)) + 1)
            if found
            else np.zeros(1, dtype=np.int64)
        )

    def batch(self, rows: list[int], pad_to: int | None = None) -> Batch:
        """Rows → a padded batch; a row index of -1 is an empty row (no labels, for equal step counts)."""
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) if r >= 0 else (0, 0) for r in rows]
        width = max(pad_to or 0, max((end - start for start, end in spans), default=0), 1)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        # Padding is a document of its own (positions from 0), so no real token attends to it.
        positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        real = 0
        for i, (start, end) in enumerate(spans):
            n = end - start
            ids[i, :n] = self.input_ids[start:end]
            labels[i, :n] = self.labels[start:end]
            positions[i, :n] = self.position_ids[start:end]
            positions[i, n:] = np.arange(width - n)
            real += n
        label_tokens = int(sum(self.label_tokens[r] for r in rows if r >= 0))
        classes = None
        if self.classes is not None:
            classes = np.asarray([self.classes[r] if r >= 0 else IGNORE_INDEX for r in rows], dtype=np.int64)
        lengths = np.asarray([end - start for start, end in spans], dtype=np.int64)
        return Batch(ids, labels, positions, label_tokens, len(rows) * width - real, list(rows), classes, lengths)


class GlobalOrder:
    """Sample position → row, independent of world size (see the module docstring)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows, self.seed = rows, seed
        self._perms: dict[int, np.ndarray] = {}

    def row(self, position: int) -> int:
        epoch, index = divmod(position, self.rows)
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return int(self._perms[epoch][index])

    def step_rows(self, step: int, global_batch: int, rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
        """This rank's micro-batches of optimizer step `step` (0-based): a contiguous share of the step."""
        share = global_batch // world
        first = step * global_batch + rank * share
        rows = [self.row(first + i) for i in range(share)]
        return [rows[a * micro : (a + 1) * micro] for a in range(accum)]

    def step_label_tokens(self, data: TokenData, step: int, global_batch: int) -> int:
        """Label tokens in the whole global batch of `step`: every rank computes it alone, no collective."""
        return int(sum(data.label_tokens[self.row(step * global_batch + i)] for i in range(global_batch)))
