"""The prepared rows on disk, written as streams: nothing proportional to the data set in memory.

Per split: `input_ids.npy` (int32) and `target_mask.npy` (uint8: 1 where the token is its own
label; every template's labels are the token or IGNORE_INDEX, so the mask is exact and a quarter
of the size), `offsets.npy` (row → token range), `doc_offsets.npy` (row → its documents),
`doc_lengths.npy` and `doc_sources.npy` (per document, in row order: positions restart at each
document; the data set it came from), `label_tokens.npy` (labels at index >= 1 of each document,
the loss's shift rule) and, for classification, `classes.npy`.
"""

from __future__ import annotations

import bisect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.runtime.data.core import IGNORE_INDEX, DataError

_CHUNK_DOCS = 8192  # documents gathered per write: bounds the memory of a write
_CHUNK_ROWS = 1 << 14  # Arrow rows read per step


class NpyWriter:
    """A 1-D .npy file written front to back (the OS keeps no dirty pages of ours mapped)."""

    def __init__(self, path: Path, dtype: Any, count: int) -> None:
        self.dtype, self.count, self.written = np.dtype(dtype), count, 0
        self.handle = path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (count,)}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def write(self, values: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.written += len(values)

    def close(self) -> None:
        if self.written < self.count:  # an empty split still gets a readable one-element file
            self.handle.write(np.zeros(self.count - self.written, dtype=self.dtype).tobytes())
        self.handle.close()


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
    mask: np.ndarray
    start: np.ndarray  # [documents] int64 offset into ids/mask
    length: np.ndarray
    targets: np.ndarray  # labels at index >= 1 (the loss's shift rule)
    classes: np.ndarray  # class id per document (-100 when not classification)
    source: np.ndarray  # data set index per document
    first: list[int]  # the first document of each data set
    split: np.ndarray | None = None  # preference: tokens of the chosen sequence in each pair-document

    @property
    def count(self) -> int:
        return len(self.start)

    @staticmethod
    def remove(work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)


def write_flat(parts: list[Any], folder: Path, labels: list[str], where: str) -> DocTable:
    """Stream the kept documents' tokens from the parts' Arrow tables into flat files; map them back."""
    import pyarrow as pa
    import pyarrow.compute as pc

    folder.mkdir(parents=True)
    lengths = [np.asarray(p.tokens.data.column("length").to_numpy())[p.keep].astype(np.int64) for p in parts]
    total = max(int(sum(int(x.sum()) for x in lengths)), 1)
    ids, mask = NpyWriter(folder / "ids.npy", np.int32, total), NpyWriter(folder / "mask.npy", np.uint8, total)
    classes = []
    for part in parts:
        for start in range(0, len(part.keep), _CHUNK_ROWS):
            table = part.tokens.data.slice(start, _CHUNK_ROWS).filter(pa.array(part.keep[start : start + _CHUNK_ROWS]))
            chunk_ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
            ids.write(chunk_ids)
            mask.write(table.column("labels").combine_chunks().flatten().to_numpy() != IGNORE_INDEX)
            if labels:
                found = pc.index_in(table.column("label"), value_set=pa.array(labels))
                if found.null_count:
                    unknown = sorted(set(table.column("label").to_pylist()) - set(labels))[:3]
                    raise DataError(f"{where}: validation labels {unknown} never occur in the training rows; check data.label_field")
                classes.append(found.to_numpy(zero_copy_only=False).astype(np.int64))
    ids.close()
    mask.close()
    length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    counts = [len(x) for x in lengths]
    targets = np.concatenate([np.asarray(p.tokens.data.column("targets").to_numpy())[p.keep] for p in parts]).astype(np.int64)
    pairs = bool(parts) and "split" in parts[0].tokens.column_names
    split = (
        np.concatenate([np.asarray(p.tokens.data.column("split").to_numpy())[p.keep] for p in parts]).astype(np.int64) if pairs else None
    )
    return DocTable(
        ids=np.load(folder / "ids.npy", mmap_mode="r"),
        mask=np.load(folder / "mask.npy", mmap_mode="r"),
        start=(np.cumsum(length) - length).astype(np.int64),
        length=length,
        targets=targets,
        classes=np.concatenate(classes) if classes else np.full(len(length), IGNORE_INDEX, dtype=np.int64),
        source=np.repeat(np.arange(len(parts)), counts).astype(np.int16),
        first=(np.cumsum(counts) - counts).astype(np.int64).tolist(),
        split=split,
    )


def write_rows(docs: DocTable, order: np.ndarray, capacity: int, prefix: Path, classification: bool, pairs: bool = False) -> dict[str, int]:
    """Documents in `order` → rows (packed to `capacity`, or one each when 0), streamed to disk.
    `pairs`: each document is a preference pair, packed whole; on disk it is two documents (chosen,
    then rejected: positions restart at each), and a row's label count is its number of pairs."""
    lengths = docs.length[order]
    row_of = pack_lengths(lengths, capacity) if capacity else np.arange(len(order), dtype=np.int64)
    by_row = np.argsort(row_of, kind="stable")  # row by row; inside a row, in shuffled order
    placed = order[by_row]
    rows = int(row_of.max()) + 1 if len(row_of) else 0
    row_tokens = np.bincount(row_of, weights=lengths, minlength=rows).astype(np.int64)
    total = int(row_tokens.sum())
    prefix.mkdir()
    ids, mask = NpyWriter(prefix / "input_ids.npy", np.int32, max(total, 1)), NpyWriter(prefix / "target_mask.npy", np.uint8, max(total, 1))
    for chunk in range(0, len(placed), _CHUNK_DOCS):
        doc = placed[chunk : chunk + _CHUNK_DOCS]
        size = docs.length[doc]
        src = np.repeat(docs.start[doc] - (np.cumsum(size) - size), size) + np.arange(int(size.sum()), dtype=np.int64)
        ids.write(docs.ids[src])
        mask.write(docs.mask[src])
    ids.close()
    mask.close()
    np.save(prefix / "offsets.npy", np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int64))
    targets: np.ndarray
    if pairs:
        targets = np.bincount(row_of, minlength=rows)
    else:
        targets = np.ones(rows) if classification else np.bincount(row_of, weights=docs.targets[order], minlength=rows)
    np.save(prefix / "label_tokens.npy", targets.astype(np.int64))
    per_row = np.bincount(row_of, minlength=rows) * (2 if pairs else 1)
    np.save(prefix / "doc_offsets.npy", np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64))
    if pairs:
        assert docs.split is not None
        chosen = docs.split[placed]
        lengths_out = np.stack([chosen, docs.length[placed] - chosen], axis=1).reshape(-1)
        np.save(prefix / "doc_lengths.npy", lengths_out.astype(np.int32))
        np.save(prefix / "doc_sources.npy", np.repeat(docs.source[placed], 2))
    else:
        np.save(prefix / "doc_lengths.npy", docs.length[placed].astype(np.int32))
        np.save(prefix / "doc_sources.npy", docs.source[placed])
    if classification:
        np.save(prefix / "classes.npy", docs.classes[placed])
    return {"rows": rows, "documents": len(order), "tokens": total}
