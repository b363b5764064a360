"""Data: source → clean → template → tokenise with prompt masking. Packing and the on-disk cache are
in `packing.py`; this module turns records into (input_ids, labels) examples.

Sources: local json/jsonl/parquet/csv files, a directory written by `save_to_disk`, a Hub id when
online, or `tiny-tasks` (the synthetic set of tiny.py). Every failure is a DataError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config.schema import DataSection

IGNORE_INDEX = -100
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(Exception):
    """A problem with the data the user can fix; the message is one line naming the file or key."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class CleanReport:
    read: int = 0
    empty: int = 0
    duplicates: int = 0
    too_long: int = 0
    truncated: int = 0
    kept: int = 0

    def line(self) -> str:
        return (
            f"data: read {self.read}, dropped {self.empty} empty, {self.duplicates} duplicate, "
            f"{self.too_long} over-long; truncated {self.truncated}; kept {self.kept}"
        )


def source_files(path: str) -> list[Path]:
    """The local files behind a data path (for fingerprints); empty for a Hub id."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return []


def fingerprint(paths: list[Path]) -> str:
    """Content hash of the source files (size + mtime would miss an in-place rewrite of equal size)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_records(path: str, data_format: str, split: str) -> list[dict[str, Any]]:
    """Read every record of a source as plain dicts (offline-safe, one-line errors)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report the failure ourselves, once
    p = Path(path)
    fmt = data_format
    if fmt == "auto":
        fmt = "saved" if p.is_dir() else _FORMATS.get(p.suffix, "hub") if p.suffix else "hub"
        if p.is_file() and p.suffix not in _FORMATS:
            raise DataError(f"{path}: unknown file type {p.suffix!r}; use .json, .jsonl, .parquet or .csv (or set data.format)")
    try:
        if fmt == "saved":
            loaded = datasets.load_from_disk(str(p))
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        elif fmt == "hub":
            ds = datasets.load_dataset(path, split=split)
        else:
            if not p.is_file():
                raise DataError(f"{path}: no such file")
            builder = "json" if fmt in ("json", "jsonl") else fmt
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        reason = _root_reason(exc)
        if fmt == "hub":
            offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            why = "the Hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else f"the Hub could not provide it ({reason})"
            raise DataError(
                f"{path}: not a local file and {why}; download it first "
                f"(huggingface-cli download --repo-type dataset {path}) or give a local path"
            ) from None
        raise DataError(f"{path}: cannot be read as {fmt} ({reason})") from None
    return [dict(row) for row in ds]


def _root_reason(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the parser's message in generic ones."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)  # type: ignore[arg-type]


def clean(records: list[dict[str, Any]], data: DataSection, report: CleanReport, task: str = "causal_lm") -> list[dict[str, Any]]:
    """Unicode-normalise the used fields, drop empty records and exact duplicates (by content hash)."""
    fields = [data.text_field, data.label_field] if task == "classification" else _fields(data)
    out, seen = [], set()
    for record in records:
        report.read += 1
        missing = [f for f in fields if f not in record]
        if missing:
            field_key = ("text_field" if missing[0] == data.text_field else "label_field") if task == "classification" else _field_key(data)
            raise DataError(f"{data.path}: record {report.read} has no field {missing[0]!r}; set data.{field_key} to its name")
        cleaned = {f: _normalize_value(record[f], data.unicode_normalization) for f in fields}
        if any(_is_empty(cleaned[f]) for f in fields):
            report.empty += 1
            continue
        if data.dedup:
            key = hashlib.sha256(json.dumps(cleaned, sort_keys=True, ensure_ascii=False).encode()).digest()
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
        out.append(cleaned)
    return out


def _fields(data: DataSection) -> list[str]:
    if data.template == "instruction":
        return [data.prompt_field, data.response_field]
    if data.template == "chat":
        return [data.messages_field]
    return [data.text_field]


def _field_key(data: DataSection) -> str:
    return {"instruction": "prompt_field/response_field", "chat": "messages_field", "text": "text_field"}[data.template]


def _normalize_value(value: Any, form: str) -> Any:
    if isinstance(value, str):
        return normalize(value, form).strip()
    if isinstance(value, list):  # chat messages
        return [{**m, "content": normalize(str(m.get("content", "")), form).strip()} for m in value if isinstance(m, dict)]
    return "" if value is None else normalize(str(value), form).strip()


def _is_empty(value: Any) -> bool:
    if isinstance(value, list):
        return not value or all(not m.get("content") for m in value)
    return not value


def instruction_prompt(prompt: str) -> str:
    """The `instruction` template's text before the response (also used to prompt at eval)."""
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def tokenize(record: dict[str, Any], data: DataSection, tokenizer: Any) -> Example:
    """Template + tokenise one record; prompt tokens get IGNORE_INDEX unless train_on_prompt."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if data.template == "text":
        text_ids = bos + tokenizer.encode(record[data.text_field], add_special_tokens=False) + eos
        return Example(text_ids, list(text_ids))
    if data.template == "instruction":
        prompt = bos + tokenizer.encode(instruction_prompt(record[data.prompt_field]), add_special_tokens=False)
        answer = tokenizer.encode(record[data.response_field], add_special_tokens=False) + eos
        spans = [(prompt, False), (answer, True)]
    else:
        spans = chat_spans(record[data.messages_field], tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for tokens, trained in spans:
        ids += tokens
        labels += tokens if (trained or data.train_on_prompt) else [IGNORE_INDEX] * len(tokens)
    return Example(ids, labels)


def chat_spans(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Split a rendered conversation into spans; only assistant replies are trained on."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    spans: list[tuple[list[int], bool]] = []
    done: list[int] = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            header = render(messages[:i], generation_prompt=True)
            _check_prefix(done, header)
            spans.append((header[len(done) :], False))
            done = header
        full = render(messages[: i + 1])
        _check_prefix(done, full)
        spans.append((full[len(done) :], message.get("role") == "assistant"))
        done = full
    return spans


def _check_prefix(prefix: list[int], full: list[int]) -> None:
    if full[: len(prefix)] != prefix:
        raise DataError("the tokenizer's chat template renders a conversation prefix differently; cannot mask prompts exactly")


def label_names(records: list[dict[str, Any]], data: DataSection) -> list[str]:
    """The classes, in a stable order: numerically when every label is an integer (0, 1, 2, ...), else sorted."""
    names = {str(record[data.label_field]) for record in records}
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def tokenize_text(text: str, tokenizer: Any, max_len: int) -> list[int]:
    """A classifier's input: [bos] text, cut to max_len (no eos: decoders pool the last real token)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + tokenizer.encode(text, add_special_tokens=False))[:max_len]
