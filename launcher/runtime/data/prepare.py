"""The preparation pipeline, in Arrow from the source file to the packed rows.

source → `to_roles` (map: columns, normalisation, row hash) → empty rows and duplicates out (numpy
over the hash column) → train / validation → `tokenize_batch` (map, `num_proc` processes) → over-long
rows out → every kept document's tokens into one flat memory-mapped array → the mix → packed rows
(packing.py). Python holds per-batch lists only; per-document numbers are numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from launcher.config.schema import DataSection
from launcher.runtime.data.columns import Source, char_limit, features, role_columns, sources_of, to_roles
from launcher.runtime.data.core import DataError
from launcher.runtime.data.mixing import mix_counts, pick
from launcher.runtime.data.report import FIRST_PROBLEMS, CleanReport, check_dropped
from launcher.runtime.data.sources import INVALID, load_source, own_val_split, split_names
from launcher.runtime.data.store import DocTable, write_flat, write_rows
from launcher.runtime.data.templates import chat_template, eval_prompt, tokenize_batch, tokenize_features

EVAL_PROMPTS = 1000  # held-out prompts kept for exact-match evaluation


class _Part:
    """One split of one data set, tokenised: the Arrow table and which of its rows are kept."""

    def __init__(self, tokens: Any, keep: np.ndarray, roles: Any, source: int) -> None:
        self.tokens, self.keep, self.roles, self.source = tokens, keep, roles, source

    @property
    def documents(self) -> int:
        return int(self.keep.sum())


def build(data: DataSection, task: str, tokenizer_dir: Path, seed: int, out: Path, resolve: Any) -> dict[str, Any]:
    """Prepare every data set into `out` (train/, val/, eval_prompts.jsonl); returns meta.json's content."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sources = sources_of(data, task, resolve)
    # preference pairs need one only for chat messages (pairs.py refuses those rows without one)
    pairs = any(s.template == "preference" for s in sources) and (data.chat_template or getattr(tokenizer, "chat_template", None))
    chat = chat_template(data.chat_template, tokenizer, tokenizer_dir) if pairs or any(s.template == "chat" for s in sources) else ""
    work = out / "work"
    work.mkdir()
    ctx = _Context(data, tokenizer, chat, work, seed)
    reports, val_reports, train_parts, val_parts = [], [], [], []
    for n, source in enumerate(sources):
        report = CleanReport(name=source.name)
        train, val, val_report = ctx.split(n, source, report, sources[0])
        report.kept = train.documents
        (val_report or report).val = val.documents
        for checked in (report, val_report):
            if checked is not None:
                check_dropped(checked, data.max_dropped_fraction, data.max_seq_len)
                val_reports += [checked] if checked is val_report else []
        reports.append(report)
        train_parts.append(train)
        val_parts.append(val)
    labels = _label_names(train_parts) if task == "classification" else []
    counts = mix_counts([p.documents for p in train_parts], [s.weight for s in sources], [s.samples for s in sources])
    for report, count in zip(reports, counts, strict=True):
        report.mixed = count
    meta: dict[str, Any] = {"task": task, "key_inputs": {"sources": [s.path for s in sources], "max_seq_len": data.max_seq_len}}
    if labels:
        meta["labels"] = labels
    for split, parts in (("train", train_parts), ("val", val_parts)):
        docs = write_flat(parts, work / split, labels, data.val_path or sources[0].path)
        if split == "train":
            rng = np.random.default_rng([seed, 7])
            chosen = [
                docs.first[i] + pick(p.documents, c, np.random.default_rng([seed, 11, i]))
                for i, (p, c) in enumerate(zip(parts, counts, strict=True))
            ]
            order = rng.permutation(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
            if not len(order):
                raise DataError(f"{sources[0].path}: no usable training examples after cleaning ({reports[0].line()})")
        else:
            order = np.random.default_rng([seed, 8]).permutation(docs.count)
        pairs = task == "preference"  # a row holds whole pairs; each sequence of a pair is bounded by max_seq_len
        capacity = (2 * data.max_seq_len if pairs else data.max_seq_len) if data.packing else 0
        meta[split] = write_rows(docs, order, capacity, out / split, bool(labels), pairs)
    meta["sources"] = [asdict(r) for r in reports]
    meta["val_sources"] = [asdict(r) for r in val_reports]
    meta["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with (out / "eval_prompts.jsonl").open("w") as handle:
        for part in val_parts if not labels else []:
            template = sources[part.source].template
            for row in part.roles.select(np.flatnonzero(part.keep)[:EVAL_PROMPTS]):
                prompt = eval_prompt(template, row, tokenizer, chat)
                if prompt is not None:
                    handle.write(json.dumps(prompt) + "\n")
    DocTable.remove(work)
    return meta


class _Context:
    def __init__(self, data: DataSection, tokenizer: Any, chat: str, work: Path, seed: int) -> None:
        self.data, self.tokenizer, self.chat, self.work, self.seed = data, tokenizer, chat, work, seed
        self.num_proc = data.num_proc if data.num_proc > 1 else None
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        self.limit = char_limit(data.max_seq_len, longest)  # characters a cell keeps (columns.char_limit)

    def split(self, n: int, source: Source, report: CleanReport, first: Source) -> tuple[_Part, _Part, CleanReport | None]:
        """Training and validation rows of one data set (never a training row in validation), and the
        validation set's own report when it is read from its own rows (data.val_split, data.val_path)."""
        data = self.data
        roles, keep = self.clean(source, source.split, f"{n}-train", report)
        hashes = np.asarray(roles.data.column("_hash").to_numpy())
        val_report: CleanReport | None = None
        # A DatasetDict's own validation (else test) split, unless a validation set is named or turned off.
        own = "" if data.val_split or data.val_path or data.val_fraction == 0 else own_val_split(source.path, source.format, source.split)
        if data.val_split or own:
            name = f"{source.name} (validation)" if data.val_split else f"{source.name} (its {own} split, used for validation)"
            val_report = CleanReport(name=name)
            val_roles, val_keep = self.clean(source, data.val_split or own, f"{n}-val", val_report, key="data.val_split")
            train_idx = keep
        elif data.val_path:
            val_source = _val_source(data, first)
            if n == 0:
                val_report = CleanReport(name=val_source.name)
                val_roles, val_keep = self.clean(val_source, val_source.split, f"{n}-val", val_report, key="data.val_path")
            else:
                val_roles, val_keep = roles, np.zeros(0, dtype=np.int64)
            train_idx = keep
        else:
            shuffled = np.random.default_rng([self.seed, 5, n]).permutation(keep)
            n_val = math.ceil(len(shuffled) * data.val_fraction) if data.val_fraction > 0 else 0
            val_roles, val_keep, train_idx = roles, np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
        val_hashes = np.asarray(val_roles.data.column("_hash").to_numpy())[val_keep]
        overlap = np.isin(val_hashes, hashes[train_idx])
        (val_report or report).val_overlap = int(overlap.sum())
        val_keep = val_keep[~overlap]
        train = self.tokenize(roles.select(train_idx), source, f"{n}-train", report)
        val = self.tokenize(val_roles.select(val_keep), source, f"{n}-val", val_report or report)
        return train, val, val_report

    def clean(self, source: Source, split: str, tag: str, report: CleanReport, key: str = "data.split") -> tuple[Any, np.ndarray]:
        """Roles of every row; the indices of the readable, non-empty, first-seen ones."""
        raw = load_source(source.path, source.format, split, cache_dir=str(self.work / "hf"), key=key)
        present = [c for c in raw.column_names if c != INVALID]
        if not present:  # every line was unreadable
            first = raw[0][INVALID] if len(raw) else "no rows"
            raise DataError(f"{source.path}: no row can be read (row 1: {first}); check the file's encoding (UTF-8) and format")
        columns = role_columns(source, present)
        kwargs = {
            "template": source.template,
            "columns": columns,
            "form": self.data.unicode_normalization,
            "path": source.path,
            "limit": self.limit,
            "invalid": INVALID if INVALID in raw.column_names else "",
        }
        roles = self.map(raw, to_roles, kwargs, features(source.template), f"{tag}-roles", list(raw.column_names), with_indices=True)
        report.read = len(roles)
        flags = {name: np.asarray(roles.data.column(name).to_numpy(zero_copy_only=False), dtype=bool) for name in ("_empty", "_missing")}
        reasons = roles.data.column("_invalid").to_numpy(zero_copy_only=False)
        invalid = np.flatnonzero(reasons.astype(bool))
        report.add_problems(len(invalid), [(int(i), str(reasons[i])) for i in invalid[:FIRST_PROBLEMS]])
        report.missing, report.empty = int(flags["_missing"].sum()), int(flags["_empty"].sum())
        candidates = np.flatnonzero(~flags["_empty"] & ~flags["_missing"] & ~reasons.astype(bool))
        if self.data.dedup and len(candidates):
            hashes = np.asarray(roles.data.column("_hash").to_numpy())[candidates]
            _, first_seen = np.unique(hashes, return_index=True)
            report.duplicates = len(candidates) - len(first_seen)
            candidates = candidates[np.sort(first_seen)]
        return roles, candidates

    def tokenize(self, roles: Any, source: Source, tag: str, report: CleanReport) -> _Part:
        data = self.data
        settings = {
            "max_seq_len": data.max_seq_len,
            "drop_longer": data.drop_longer,
            "train_on_prompt": data.train_on_prompt,
            "chat_template": self.chat,
        }
        kwargs = {"template": source.template, "tokenizer": self.tokenizer, "settings": settings}
        drop = list(roles.column_names)
        tokens = self.map(roles, tokenize_batch, kwargs, tokenize_features(source.template), f"{tag}-tokens", drop)
        overlong = np.asarray(tokens.data.column("overlong").to_numpy(zero_copy_only=False), dtype=bool)
        targets = np.asarray(tokens.data.column("targets").to_numpy())
        reasons = tokens.data.column("invalid").to_numpy(zero_copy_only=False)
        refused = reasons.astype(bool)
        if refused.any():
            rows = np.asarray(roles.data.column("_row").to_numpy())
            at = np.flatnonzero(refused)
            report.add_problems(len(at), [(int(rows[i]), str(reasons[i])) for i in at[:FIRST_PROBLEMS]])
        dropped = overlong & data.drop_longer & (source.template != "classification")
        if source.template == "preference":  # a pair whose responses are the same teaches nothing
            same = np.asarray(tokens.data.column("identical").to_numpy(zero_copy_only=False), dtype=bool) & ~dropped & ~refused
            report.identical += int(same.sum())
            refused = refused | same
        report.too_long += int(dropped.sum())
        report.truncated += int((overlong & ~dropped).sum())
        untrainable = ~dropped & ~refused & (targets == 0)  # nothing to learn (a truncated prompt)
        report.untrainable += int(untrainable.sum())
        return _Part(tokens, ~dropped & ~untrainable & ~refused, roles, int(tag.split("-")[0]))

    def map(self, ds: Any, fn: Any, kwargs: dict[str, Any], feats: Any, tag: str, remove: list[str], with_indices: bool = False) -> Any:
        """datasets.map, batched, into our own Arrow file; a DataError from a worker comes out as itself."""
        stamp = hashlib.sha256(f"{self.work}{tag}".encode()).hexdigest()[:16]
        if len(ds) == 0:  # map skips an empty set, columns and all
            from datasets import Dataset

            return Dataset.from_dict({name: [] for name in feats}, features=feats)
        try:
            return ds.map(
                fn,
                batched=True,
                with_indices=with_indices,
                num_proc=self.num_proc if len(ds) >= 2 * (self.num_proc or 1) else None,
                remove_columns=remove,
                features=feats,
                fn_kwargs=kwargs,
                cache_file_name=str(self.work / f"{tag}.arrow"),
                new_fingerprint=stamp,
                load_from_cache_file=False,
            )
        except Exception as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise DataError(str(cause)) from None
            raise


def _val_source(data: DataSection, first: Source) -> Source:
    """data.val_path read with the first data set's template and columns; its split chosen, never guessed."""
    from dataclasses import replace

    path = data.val_path
    split = data.val_split
    if not split:
        names = split_names(path, "auto")
        if len(names) != 1:
            raise DataError(f"data.val_path: {path} has the splits {', '.join(names)}; set data.val_split to the validation one")
        split = names[0]
    if Path(path).resolve() == Path(first.path).resolve() and split == first.split:
        raise DataError(f"data.val_path: {path} split {split!r} is the training split; set data.val_split to another split")
    return replace(first, name=f"{first.name} (validation)", path=path, format="auto", split=split)


def _label_names(parts: list[_Part]) -> list[str]:
    """The classes, in a stable order: numerically when every label is an integer (0, 1, 2, ...), else sorted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names: set[str] = set()
    for part in parts:
        column = part.tokens.data.column("label")
        names |= {str(v) for v in pc.unique(column.filter(pa.array(part.keep))).to_pylist()}
    if names and all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)
