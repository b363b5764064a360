"""Data: sources → columns → clean → template → tokens, in Arrow; packing and the cache are in
`packing.py`. Modules: core (shared names), sources (reading), columns (roles, ShareGPT/OpenAI
turns), templates (prompt masking, chat templates), mixing (several data sets), report (the
cleaning report), store (the rows on disk, packing), prepare (the pipeline). The record-level helpers below serve small inputs
(tests, benchmarks); preparation never turns rows into Python objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from launcher.config.schema import DataSection
from launcher.runtime.data.columns import normalize, role_columns, sources_of, to_roles
from launcher.runtime.data.core import IGNORE_INDEX, DataError, Example
from launcher.runtime.data.report import CleanReport
from launcher.runtime.data.sources import fingerprint, load_records, load_source, source_files
from launcher.runtime.data.templates import alpaca_prompt, instruction_prompt, tokenize_batch

__all__ = [
    "IGNORE_INDEX",
    "CleanReport",
    "DataError",
    "Example",
    "alpaca_prompt",
    "clean",
    "fingerprint",
    "instruction_prompt",
    "load_records",
    "load_source",
    "normalize",
    "source_files",
    "tokenize",
]


def clean(records: list[dict[str, Any]], data: DataSection, report: CleanReport, task: str = "causal_lm") -> list[dict[str, Any]]:
    """Rows → role dicts, normalised, without empty rows and duplicates (the pipeline's rules, on a list)."""
    source = sources_of(data, task)[0]
    present = list(dict.fromkeys(k for r in records for k in r)) or ["(none)"]
    columns = role_columns(source, present)
    batch = {c: [r.get(c) for r in records] for c in set(columns.values())}
    roles = to_roles(batch, list(range(len(records))), source.template, columns, data.unicode_normalization, data.path)
    report.read += len(records)
    out, seen = [], set()
    for i in range(len(records)):
        if roles["_invalid"][i]:
            report.add_problems(1, [(i, roles["_invalid"][i])])
            continue
        if roles["_missing"][i] or roles["_empty"][i]:
            report.missing += roles["_missing"][i]
            report.empty += roles["_empty"][i]
            continue
        if data.dedup and roles["_hash"][i] in seen:
            report.duplicates += 1
            continue
        seen.add(roles["_hash"][i])
        out.append({k: v[i] for k, v in roles.items() if not k.startswith("_")})
    report.kept += len(out)
    return out


def tokenize(record: dict[str, Any], data: DataSection, tokenizer: Any, task: str = "causal_lm") -> Example:
    """Template + tokenise one role dict; prompt tokens get IGNORE_INDEX unless train_on_prompt."""
    template = "classification" if task == "classification" else data.template
    settings: dict[str, Any] = {"max_seq_len": np.iinfo(np.int32).max, "drop_longer": False, "train_on_prompt": data.train_on_prompt}
    if template == "chat":
        from launcher.runtime.data.templates import chat_template

        settings["chat_template"] = chat_template(data.chat_template, tokenizer, "the tokenizer")
    out = tokenize_batch({k: [v] for k, v in record.items()}, template, tokenizer, settings).to_pydict()
    return Example(list(out["input_ids"][0]), list(out["labels"][0]))
