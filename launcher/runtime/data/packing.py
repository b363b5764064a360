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

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from launcher.config.schema import DataSection
from launcher.runtime.data import IGNORE_INDEX, fingerprint, source_files
from launcher.runtime.data.store import pack_lengths

# Bump when the on-disk rows change (2: no length sort; 3: classification, shifted label counts;
# 5: Arrow pipeline, mixes, report per data set; target mask and document lengths, see data/store.py;
# 6: OpenAI content parts read as their text, not their repr; 7: unreadable rows counted and
# dropped, cells cut at columns.char_limit, a validation set's own report; 8: a DatasetDict's own
# validation split used by default; 9: preference pairs that are whole conversations take their
# shared opening turns as the prompt; 10: the tokenizer keyed by its files' names and bytes, not its folder).
CACHE_VERSION = 10
# What AutoTokenizer reads from a model folder: the tokenizer's own files (transformers' names for the
# fast tokenizer, its config, the legacy maps, the chat templates, the slow vocabularies), and from
# config.json the fields that choose the tokenizer class (with model_type qwen2 the same tokenizer.json
# loads as a Qwen2Tokenizer, which builds its own pre-tokenizer: not the same tokens in general).
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "*.jinja",
    "additional_chat_templates/*.jinja",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
)
CLASS_FIELDS = ("model_type", "tokenizer_class")
SPLITS = ("train", "val")
__all__ = ["CACHE_VERSION", "Batch", "GlobalOrder", "TokenData", "cache_key", "pack_lengths", "prepare_data"]


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
    sequences: np.ndarray | None = None  # [rows, length] the batch's sequence index of each token (-1: padding)
    documents: np.ndarray | None = None  # [sequences] each one's document index in the split (preference pairs: 2k, 2k + 1)


def _file_part(path: str) -> str:
    return fingerprint(source_files(path)) if path else ""


def tokenizer_fingerprint(folder: Path) -> str:
    """The tokenizer by what it is, not where: its files' names and bytes and the class-choosing fields
    of config.json. The same tokenizer in another folder (a copy, another snapshot) reuses the data."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()}):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())  # no two files read alike
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    config = folder / "config.json"
    text = config.read_text(errors="replace") if config.is_file() else "{}"
    try:
        fields = json.loads(text)
        chosen = json.dumps({k: fields.get(k) for k in CLASS_FIELDS}, sort_keys=True) if isinstance(fields, dict) else text
    except ValueError:  # not JSON: loading the model says so; the key takes the whole file
        chosen = text
    digest.update(chosen.encode())
    return digest.hexdigest()[:16]


def cache_key(data: DataSection, data_source: str, tokenizer_dir: Path, seed: int, task: str = "causal_lm") -> str:
    template_file = Path(data.chat_template) if data.chat_template and "{" not in data.chat_template else None
    parts = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in asdict(data).items() if k not in ("num_proc", "cache_dir")},
        "source": _file_part(data_source) or data_source,
        "datasets": [_file_part(d.path) or d.path for d in data.datasets],
        "val_source": _file_part(data.val_path),
        "chat_template": fingerprint([template_file]) if template_file is not None and template_file.is_file() else "",
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "seed": seed,
        "task": task,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(data: DataSection, data_source: str, tokenizer_dir: Path, cache_root: Path, seed: int, task: str = "causal_lm") -> Path:
    """Build (or find) the cache folder for these settings; returns it. Safe to call from every rank."""
    from dataclasses import replace

    from launcher.runtime.data.prepare import build
    from launcher.runtime.model.tiny import shipped_data

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


class TokenData:
    """One split of a prepared cache, memory-mapped (the format: data/store.py)."""

    def __init__(self, folder: Path, split: str) -> None:
        part = folder / split
        self.input_ids = np.load(part / "input_ids.npy", mmap_mode="r")
        self.target_mask = np.load(part / "target_mask.npy", mmap_mode="r")
        self.offsets = np.load(part / "offsets.npy")
        self.label_tokens = np.load(part / "label_tokens.npy")
        self.classes = np.load(part / "classes.npy") if (part / "classes.npy").exists() else None
        self.doc_offsets = np.load(part / "doc_offsets.npy")  # row -> its documents
        self.doc_lengths = np.load(part / "doc_lengths.npy", mmap_mode="r")
        self.doc_sources = np.load(part / "doc_sources.npy", mmap_mode="r")  # data set index per document
        self.pad_id = int(json.loads((folder / "meta.json").read_text())["pad_token_id"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def labels(self) -> np.ndarray:
        """Every token's label (the whole split in memory: for tests and small sets only)."""
        return np.where(np.asarray(self.target_mask[: self.offsets[-1]]) != 0, self.input_ids[: self.offsets[-1]], IGNORE_INDEX)

    def _sizes(self, row: int) -> np.ndarray:
        return np.asarray(self.doc_lengths[self.doc_offsets[row] : self.doc_offsets[row + 1]], dtype=np.int64)

    def _positions(self, row: int) -> np.ndarray:
        sizes = self._sizes(row)
        return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)

    def sources(self, rows: list[int]) -> np.ndarray:
        """Documents per data set in these rows (the mix a run actually trained on)."""
        found = [self.doc_sources[self.doc_offsets[r] : self.doc_offsets[r + 1]] for r in rows if r >= 0]
        width = int(self.doc_sources.max(initial=0)) + 1
        return np.bincount(np.concatenate(found).astype(np.int64), minlength=width) if found else np.zeros(width, dtype=np.int64)

    def batch(self, rows: list[int], pad_to: int | None = None) -> Batch:
        """Rows → a padded batch; a row index of -1 is an empty row (no labels, for equal step counts)."""
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) if r >= 0 else (0, 0) for r in rows]
        width = max(pad_to or 0, max((end - start for start, end in spans), default=0), 1)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        # Padding is a document of its own (positions from 0), so no real token attends to it.
        positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        real = 0
        sequences = np.full((len(rows), width), -1, dtype=np.int64)
        documents = [np.arange(self.doc_offsets[r], self.doc_offsets[r + 1], dtype=np.int64) for r in rows if r >= 0]
        base = 0
        for i, (row, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            n = end - start
            if n == 0:
                continue
            sequences[i, :n] = base + np.repeat(np.arange(int(self.doc_offsets[row + 1] - self.doc_offsets[row])), self._sizes(row))
            base = int(sequences[i, n - 1]) + 1
            ids[i, :n] = self.input_ids[start:end]
            labels[i, :n] = np.where(self.target_mask[start:end] != 0, ids[i, :n], IGNORE_INDEX)
            positions[i, :n] = self._positions(row)
            positions[i, n:] = np.arange(width - n)
            real += n
        label_tokens = int(sum(self.label_tokens[r] for r in rows if r >= 0))
        classes = None
        if self.classes is not None:
            classes = np.asarray([self.classes[r] if r >= 0 else IGNORE_INDEX for r in rows], dtype=np.int64)
        lengths = np.asarray([end - start for start, end in spans], dtype=np.int64)
        docs = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
        return Batch(ids, labels, positions, label_tokens, len(rows) * width - real, list(rows), classes, lengths, sequences, docs)


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
