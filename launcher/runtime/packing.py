"""Tokenised data on disk, prepared once, memory-mapped by every rank.

`prepare_data` runs before the distributed job (`launcher prepare`, `launcher run`, and the sbatch
script) or, if that was skipped, on the first rank to take the file lock — never while other ranks
wait inside a collective. Rows hold several documents when packing is on: position ids restart at
each document, which is what the attention path uses to keep documents apart.

The global sample order depends only on the seed and the number of rows, never on the world size:
sample k is row perm_epoch[k % rows] of epoch k // rows, so a resumed run at another world size
continues with the same rows.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from launcher.config.schema import DataSection
from launcher.runtime.data import (
    IGNORE_INDEX,
    CleanReport,
    DataError,
    Example,
    chat_spans,
    clean,
    fingerprint,
    instruction_prompt,
    label_names,
    load_records,
    source_files,
    tokenize,
    tokenize_text,
)

CACHE_VERSION = 3  # bump when the on-disk rows change (2: no length sort; 3: classification, shifted label counts)
SPLITS = ("train", "val")


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


def cache_key(data: DataSection, data_source: str, tokenizer_dir: Path, seed: int, task: str = "causal_lm") -> str:
    tokenizer_files = sorted(p for p in tokenizer_dir.glob("tokenizer*") if p.is_file()) + sorted(tokenizer_dir.glob("*.jinja"))
    parts = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in asdict(data).items() if k not in ("num_proc", "cache_dir")},
        "source": fingerprint(source_files(data_source)) or data_source,
        "val_source": fingerprint(source_files(data.val_path)) if data.val_path else "",
        "tokenizer": fingerprint(tokenizer_files),
        "seed": seed,
        "task": task,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(data: DataSection, data_source: str, tokenizer_dir: Path, cache_root: Path, seed: int, task: str = "causal_lm") -> Path:
    """Build (or find) the cache folder for these settings; returns it. Safe to call from every rank."""
    folder = cache_root / cache_key(data, data_source, tokenizer_dir, seed, task)
    if (folder / "COMPLETE").exists():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "COMPLETE").exists():
            return folder
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _build(data, data_source, tokenizer_dir, seed, tmp, task)
        (tmp / "COMPLETE").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def _build(data: DataSection, data_source: str, tokenizer_dir: Path, seed: int, out: Path, task: str = "causal_lm") -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    report = CleanReport()
    records = clean(load_records(data_source, data.format, data.split), data, report, task)
    if data.val_path:
        val_records = clean(load_records(data.val_path, "auto", data.split), data, CleanReport(), task)
        train_records = records
    else:
        random.Random(seed).shuffle(records)
        n_val = math.ceil(len(records) * data.val_fraction) if data.val_fraction > 0 else 0
        val_records, train_records = records[:n_val], records[n_val:]
    meta: dict[str, Any] = {"key_inputs": {"source": data_source, "template": data.template, "max_seq_len": data.max_seq_len}, "task": task}
    labels = label_names(train_records, data) if task == "classification" else []
    if labels:
        meta["labels"] = labels
        unknown = sorted({str(r[data.label_field]) for r in val_records} - set(labels))
        if unknown:
            raise DataError(f"{data.val_path or data_source}: validation labels {unknown[:3]} never occur in the training rows; check data.label_field")
    for split, split_records in (("train", train_records), ("val", val_records)):
        examples, classes = [], []
        for record in split_records:
            if labels:
                ids = tokenize_text(record[data.text_field], tokenizer, data.max_seq_len)
                example = Example(ids, [IGNORE_INDEX] * len(ids))
                classes.append(labels.index(str(record[data.label_field])))
                examples.append(example)
                continue
            example = tokenize(record, data, tokenizer)
            if len(example.input_ids) > data.max_seq_len:
                if data.drop_longer:
                    report.too_long += split == "train"
                    continue
                report.truncated += split == "train"
                example = Example(example.input_ids[: data.max_seq_len], example.labels[: data.max_seq_len])
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                continue  # nothing to learn from (a truncated prompt)
            examples.append(example)
        if split == "train" and not examples:
            raise DataError(f"{data_source}: no usable training examples after cleaning ({report.line()})")
        rows = pack(examples, data.max_seq_len) if data.packing else [[e] for e in examples]
        meta[split] = _write_rows(rows, out / split)
        if labels:
            np.save(out / split / "classes.npy", np.asarray(classes, dtype=np.int64))
            np.save(out / split / "label_tokens.npy", np.ones(len(rows), dtype=np.int64))  # one example, one loss term
    report.kept = meta["train"]["documents"]
    meta["report"] = asdict(report)
    meta["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with (out / "eval_prompts.jsonl").open("w") as handle:
        for record in val_records if not labels else []:
            prompt = _eval_prompt(record, data, tokenizer)
            if prompt is not None:
                handle.write(json.dumps(prompt) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def pack(examples: list[Example], capacity: int) -> list[list[Example]]:
    """Best fit, in the (already shuffled) order given: each document goes into the fullest row
    that still has room. Not sorted by length first: that would fill rows with documents of one
    length (often one task), and batches of such rows are far from a random sample."""
    order = range(len(examples))
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        size = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(examples[i])
            bisect.insort(free, (room - size, row))
        else:
            rows.append([examples[i]])
            bisect.insort(free, (capacity - size, len(rows) - 1))
    return rows


def _write_rows(rows: list[list[Example]], prefix: Path) -> dict[str, int]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    offsets, counts = [0], []
    for row in rows:
        for doc in row:
            ids += doc.input_ids
            labels += doc.labels
            positions += range(len(doc.input_ids))
        offsets.append(len(ids))
        # The loss's own shift rule: token t is predicted from t-1 inside its document, so a
        # document's first label is never a target and is not counted in the denominator.
        counts.append(sum(label != IGNORE_INDEX for doc in row for label in doc.labels[1:]))
    prefix.mkdir()
    np.save(prefix / "input_ids.npy", np.asarray(ids, dtype=np.int32))
    np.save(prefix / "labels.npy", np.asarray(labels, dtype=np.int32))
    np.save(prefix / "position_ids.npy", np.asarray(positions, dtype=np.int32))
    np.save(prefix / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(prefix / "label_tokens.npy", np.asarray(counts, dtype=np.int64))
    return {"rows": len(rows), "documents": sum(len(r) for r in rows), "tokens": len(ids)}


def _eval_prompt(record: dict[str, Any], data: DataSection, tokenizer: Any) -> dict[str, Any] | None:
    if data.template == "instruction":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + tokenizer.encode(instruction_prompt(record[data.prompt_field]), add_special_tokens=False)
        return {"prompt_ids": ids, "answer": record[data.response_field]}
    if data.template == "chat":
        messages = record[data.messages_field]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            return None
        spans = chat_spans(messages, tokenizer)
        prompt_ids = [t for tokens, _ in spans[:-1] for t in tokens]
        return {"prompt_ids": prompt_ids, "answer": messages[-1]["content"]}
    return None


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
        self.pad_id = int(json.loads((folder / "meta.json").read_text())["pad_token_id"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

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
