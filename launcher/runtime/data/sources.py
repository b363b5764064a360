"""Where rows come from: local json/jsonl/parquet/csv files, a `save_to_disk` folder (a Dataset or a
DatasetDict), a Hub id when online. Everything stays an Arrow `datasets.Dataset` (memory-mapped):
no row becomes a Python object here. Every failure is one DataError naming the file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from launcher.runtime.data.core import DataError

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# The column a checked copy of a JSON Lines file gives each line it could not read: why (see
# `checked_json`); `to_roles` counts those rows as invalid, so row numbers stay the file's.
INVALID = "__launcher_invalid__"
_BLOCK = 8 << 20


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


def _quiet() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report the failure ourselves, once
    return datasets


def resolve_format(path: str, data_format: str) -> str:
    p = Path(path)
    if data_format != "auto":
        return "json" if data_format == "jsonl" else data_format
    if p.is_dir():
        return "saved"
    if p.is_file() and p.suffix not in _FORMATS:
        raise DataError(f"{path}: unknown file type {p.suffix!r}; use .json, .jsonl, .parquet or .csv (or set data.format)")
    return _FORMATS.get(p.suffix, "hub") if p.suffix else "hub"


def load_source(path: str, data_format: str, split: str, cache_dir: str | None = None, key: str = "data.split") -> Any:
    """One split of a source as an Arrow Dataset. `key` names the setting that chose the split."""
    datasets = _quiet()
    p = Path(path)
    fmt = resolve_format(path, data_format)
    try:
        if fmt == "saved":
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    names = ", ".join(loaded)
                    raise DataError(f"{path}: has no split {split!r} ({key}); its splits are {names}")
                return loaded[split]
            if split != "train":
                raise DataError(
                    f"{path}: is one Dataset without splits, so {key}={split!r} cannot be read; use data.val_fraction or data.val_path"
                )
            return loaded
        if fmt == "hub":
            return datasets.load_dataset(path, split=split)
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        if split != "train":
            raise DataError(
                f"{path}: a {fmt} file has one split (train), so {key}={split!r} cannot be read; use data.val_fraction or data.val_path"
            )
        if fmt != "json":
            return datasets.load_dataset(fmt, data_files=str(p), split="train", cache_dir=cache_dir)
        work = Path(cache_dir) if cache_dir else p.parent
        readable = p if _is_utf8(p) else checked_json(p, work)
        try:
            return datasets.load_dataset("json", data_files=str(readable), split="train", cache_dir=cache_dir)
        except Exception:
            if readable != p or not _json_lines(p):
                raise
        return datasets.load_dataset("json", data_files=str(checked_json(p, work)), split="train", cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        reason = root_reason(exc)
        if fmt == "hub":
            offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            why = "the Hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else f"the Hub could not provide it ({reason})"
            raise DataError(
                f"{path}: not a local file and {why}; download it first "
                f"(huggingface-cli download --repo-type dataset {path}) or give a local path"
            ) from None
        raise DataError(f"{path}: cannot be read as {fmt} ({reason})") from None


def _is_utf8(path: Path) -> bool:
    """Whether every byte of the file is UTF-8 (pyarrow reads bad bytes into strings unchecked; they
    fail later, batch by batch, without a row). One pass in C, ~1 s a GB."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _json_lines(path: Path) -> bool:
    """JSON Lines (one object a line), as opposed to one JSON document: the first non-blank byte is `{`
    and a second line holds another object (or the suffix says so)."""
    if path.suffix == ".jsonl":
        return True
    with path.open("rb") as handle:
        head = handle.read(1 << 16).lstrip()
    return head.startswith(b"{") and b"\n{" in head.replace(b"\r\n", b"\n").replace(b"\n ", b"\n")


def checked_json(path: Path, work: Path) -> Path:
    """A JSON Lines file as the pipeline can read it: a copy in `work` where each line that is not UTF-8,
    not JSON or not an object is replaced by `{INVALID: why}` (then counted and reported per row, and
    dropped within data.max_dropped_fraction). One JSON document with such a fault is refused whole."""
    if not _json_lines(path):
        line = _first_bad_line(path)
        raise DataError(f"{path}: line {line} is not valid UTF-8 or JSON; fix or remove it (or write the data as JSON Lines)")
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"checked-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}.jsonl"
    with path.open("rb") as src, out.open("w", encoding="utf-8") as dst:
        for number, raw in enumerate(src, 1):
            why = _line_fault(raw, number)
            dst.write(raw.decode("utf-8") if why is None else json.dumps({INVALID: why}) + "\n")
    return out


def _line_fault(raw: bytes, number: int) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"line {number} is not valid UTF-8 (at byte {exc.start + 1} of the line)"
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"line {number} is not JSON ({str(exc).split(':')[0]})"
    if not isinstance(value, dict):
        return f"line {number} is a JSON {type(value).__name__}, not an object"
    return None


def _first_bad_line(path: Path) -> int:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def split_names(path: str, data_format: str) -> list[str]:
    """The splits a source has (a saved DatasetDict's names; one `train` for a file)."""
    datasets = _quiet()
    if resolve_format(path, data_format) == "saved":
        loaded = datasets.load_from_disk(path)
        return list(loaded) if isinstance(loaded, datasets.DatasetDict) else ["train"]
    return ["train"]


def own_val_split(path: str, data_format: str, train_split: str) -> str:
    """The split a saved DatasetDict keeps for evaluation (`validation`, else `test`), or "": used
    when no validation set is named, rather than holding out part of the training rows."""
    if resolve_format(path, data_format) != "saved":
        return ""
    try:
        names = split_names(path, data_format)
    except Exception:  # not a saved data set: reading it for training says why, in its own words
        return ""
    return next((name for name in ("validation", "test") if name in names and name != train_split), "")


def load_records(path: str, data_format: str, split: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Every record of a small source as plain dicts (tests and benchmarks; the pipeline stays in Arrow)."""
    return [dict(row) for row in load_source(path, data_format, split, cache_dir=cache_dir)]


def root_reason(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the parser's message in generic ones."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
