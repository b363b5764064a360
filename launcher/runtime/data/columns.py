"""From the user's columns to the roles a template needs.

A `Source` is one data set with everything resolved (its path, split, template and role → column
map). `to_roles` is the batched `datasets.map` function that reads those columns, normalises the
text, turns ShareGPT turns (`from`/`value`, human/gpt) into OpenAI messages (`role`/`content`),
flags empty rows and hashes each row's roles (for dedup: every column the template uses counts).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config.schema import DataSection
from launcher.runtime.data.core import DataError

# Roles each template reads; the optional ones may be absent from the data.
ROLES = {
    "text": ("text",),
    "instruction": ("prompt", "response"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "system"),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),  # each text, or a list of chat messages (TRL's formats)
}
OPTIONAL = {"input", "system"}
_LEGACY_KEYS = {
    "prompt": "prompt_field",
    "response": "response_field",
    "messages": "messages_field",
    "text": "text_field",
    "label": "label_field",
}
_ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    format: str
    split: str
    template: str  # a key of ROLES ("classification" for that task)
    columns: dict[str, str] = field(default_factory=dict)  # role -> column, as configured
    weight: float = 1.0
    samples: int = 0
    mapped: tuple[str, ...] = ()  # roles the user mapped on purpose (then even an optional one must exist)


def sources_of(data: DataSection, task: str, resolve: Any = None) -> list[Source]:
    """The data sets of a run: data.datasets, or the one data.path. `resolve` maps shipped names to files."""

    def build(
        path: str, name: str, fmt: str, split: str, template: str | None, columns: dict[str, str], weight: float, samples: int
    ) -> Source:
        real = str(resolve(path)) if resolve is not None else path
        base = {role: getattr(data, key) for role, key in _LEGACY_KEYS.items()}
        used = task if task in ("classification", "preference") else (template or data.template)
        return Source(
            name=name or Path(path.rstrip("/")).name or path,
            path=real,
            format=fmt,
            split=split or data.split,
            template=used,
            columns={**base, **data.columns, **columns},
            weight=weight,
            samples=samples,
            mapped=tuple(sorted({*data.columns, *columns})),
        )

    if not data.datasets:
        return [build(data.path, "", data.format, data.split, None, {}, 1.0, 0)]
    return [build(s.path, s.name, s.format, s.split, s.template, dict(s.columns), s.weight, s.samples) for s in data.datasets]


def role_columns(source: Source, present: list[str]) -> dict[str, str]:
    """role -> column for this source's template; a missing required column is a one-line error."""
    explicit = set(source.mapped)
    out: dict[str, str] = {}
    for role in ROLES[source.template]:
        column = source.columns.get(role, role)
        if column == "messages" and column not in present and role not in explicit and "conversations" in present:
            column = "conversations"  # ShareGPT's name for it
        if column in present:
            out[role] = column
        elif (role not in OPTIONAL and (source.template, role) != ("preference", "prompt")) or role in explicit:
            # a pair without a prompt column has it inside chosen and rejected (TRL's implicit prompt)
            key = f"data.{_LEGACY_KEYS[role]}" if role in _LEGACY_KEYS else f"data.columns.{role}"
            raise DataError(
                f"{source.path}: row 1 has no column {column!r} (the {role} of template {source.template}); "
                f"set {key} (or data.columns.{role}) to one of: {', '.join(present)}"
            )
    return out


def features(template: str) -> Any:
    from datasets import Features, List, Value

    string = Value("string")
    cols: dict[str, Any] = {role: string for role in ROLES[template] if role not in ("messages", "system")}
    if template == "chat":
        cols["messages"] = List({"role": string, "content": string})
    flags = {"_hash": Value("int64"), "_empty": Value("bool"), "_missing": Value("bool"), "_invalid": string, "_row": Value("int64")}
    return Features({**cols, **flags})


def normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)  # type: ignore[arg-type]


class RowFault(Exception):
    """One row the pipeline cannot read (wrong type, unknown role, a part that is not text): counted,
    reported with its row number, and dropped within data.max_dropped_fraction."""


def _text(value: Any, form: str, limit: int = 0, what: str = "") -> str:
    """A cell as text: numbers and booleans as written, lists and mappings refused. `limit` cuts it to
    that many characters: a row longer than that is over-long whatever it says (see `char_limit`),
    and tokenising it whole would cost memory in proportion to the row, not to data.max_seq_len."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        raise RowFault(f"{what or 'a column'} holds {_kind(value)}, not text")
    text = value if isinstance(value, str) else str(value)
    if limit and len(text) > limit:
        text = text[: 4 * limit]  # normalisation may merge characters: cut after it too
        return normalize(text, form)[:limit]
    return normalize(text, form).strip()


def _kind(value: Any) -> str:
    """A JSON value's kind, as a message says it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "a mapping"
    return f"a {type(value).__name__}"


def char_limit(max_seq_len: int, longest_token: int) -> int:
    """Characters past which a text has more than max_seq_len tokens: no token spans more than
    `longest_token` characters (the vocabulary's longest entry, in bytes for byte-level vocabularies),
    doubled for normalisers that drop characters (accents). Tokenizers that drop whitespace (WordPiece)
    can beat it on text that is mostly whitespace: such a row keeps its first tokens, not all."""
    return 2 * (max_seq_len + 1) * max(longest_token, 1)


def to_roles(
    batch: dict[str, list[Any]],
    indices: list[int],
    template: str,
    columns: dict[str, str],
    form: str,
    path: str,
    limit: int = 0,
    invalid: str = "",
) -> dict[str, list[Any]]:
    """Batched map: the user's columns → normalised role columns + `_empty` (present, but nothing to
    train on), `_missing` (a required column absent or null), `_invalid` (why the row cannot be read,
    else ""), `_row` (its index in the source) and `_hash`. `invalid` names a column of reasons a
    checked copy of the file gives unreadable lines (sources.checked_json)."""
    n = len(indices)
    out: dict[str, list[Any]] = {"_invalid": [""] * n, "_missing": [False] * n}
    given = batch[invalid] if invalid else [None] * n
    if template == "preference":
        out["prompt"] = ["null"] * n  # no prompt column: pairs.py finds it inside chosen and rejected
        for role in (r for r in ROLES[template] if r in columns):
            out[role] = []
            for i, value in enumerate(batch[columns[role]]):
                try:
                    out[role].append(_pair_part(value, form, limit, columns[role]) if not given[i] else "")
                except RowFault as fault:
                    out[role].append("")
                    out["_invalid"][i] = out["_invalid"][i] or str(fault)
        out["_missing"] = [any(batch[columns[r]][i] is None for r in columns) and not given[i] for i in range(n)]
        # a prompt may be empty (TRL allows it); a response may not
        empty = [any(out[r][i] in ("", '""', "[]") for r in ("chosen", "rejected")) for i in range(n)]
    elif template == "chat":
        column = columns["messages"]
        system = batch[columns["system"]] if "system" in columns else [None] * n
        out["messages"] = []
        for i in range(n):
            turns = batch[column][i]
            out["_missing"][i] = turns is None and not given[i]
            try:
                msgs = _messages(turns, system[i], form, column, limit) if not given[i] else []
            except RowFault as fault:
                msgs, out["_invalid"][i] = [], str(fault)
            out["messages"].append(msgs)
        empty = [not any(m["role"] == "assistant" and m["content"] for m in msgs) for msgs in out["messages"]]
    else:
        for role, column in columns.items():
            values = out[role] = []
            for i, value in enumerate(batch[column]):
                try:
                    values.append(_text(value, form, limit, f"column {column!r}"))
                except RowFault as fault:
                    values.append("")
                    out["_invalid"][i] = out["_invalid"][i] or str(fault)
        required = [r for r in columns if r not in OPTIONAL]
        out["_missing"] = [any(batch[columns[r]][i] is None for r in required) and not given[i] for i in range(n)]
        empty = [any(not out[r][i] for r in required) for i in range(n)]
    for i in range(n):
        if given[i]:
            out["_invalid"][i] = str(given[i])
        if out["_invalid"][i] or out["_missing"][i]:
            empty[i] = False
    out["_empty"] = empty
    out["_row"] = list(indices)
    roles = [r for r in ROLES[template] if r in out]
    out["_hash"] = [_hash([out[r][i] for r in roles]) for i in range(n)]
    return out


def _pair_part(value: Any, form: str, limit: int, column: str) -> str:
    """A preference cell as JSON: text as a string, chat messages (TRL's conversational format) as a
    list of role/content turns. Datasets' columns have one type, so both travel as JSON text."""
    if isinstance(value, list):
        return json.dumps(_messages(value, None, form, column, limit), ensure_ascii=False)
    if isinstance(value, dict):
        raise RowFault(f"column {column!r} holds a mapping, not text or a list of messages")
    # Not stripped: TRL joins prompt + response as written (" 7" after "3 + 4 =").
    text = "" if value is None else normalize(value if isinstance(value, str) else str(value), form)
    return json.dumps(text[:limit] if limit else text, ensure_ascii=False)


def _hash(values: list[Any]) -> int:
    digest = hashlib.blake2b(json.dumps(values, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _messages(turns: Any, system: Any, form: str, column: str, limit: int = 0) -> list[dict[str, str]]:
    """OpenAI (role/content) or ShareGPT (from/value) turns → OpenAI messages; a row that is neither is a
    RowFault. Past `limit` characters of content the conversation is over-long: later turns are left out."""
    if turns is None:
        return []
    if isinstance(turns, str):
        raise RowFault(f"column {column!r} holds text, not a list of turns (use data.template: text, or map data.columns.messages)")
    if not isinstance(turns, list):
        raise RowFault(f"column {column!r} holds {_kind(turns)}, not a list of turns")
    out: list[dict[str, str]] = []
    if system:
        out.append({"role": "system", "content": _text(system, form, limit, "the system column")})
    budget = limit or -1
    for turn in turns:
        if not isinstance(turn, dict):
            raise RowFault(f"a turn is {_kind(turn)}, not a mapping with role/content (or from/value)")
        raw_role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if raw_role is None:
            raise RowFault("a turn has no 'role' (OpenAI) or 'from' (ShareGPT) key")
        role = _ROLE_NAMES.get(str(raw_role).lower())
        if role is None:
            raise RowFault(f"unknown role {str(raw_role)[:40]!r}; use system, user or assistant (ShareGPT: system, human, gpt)")
        text = _text(_content_text(content), form, max(budget, 0), "a turn's content")
        out.append({"role": role, "content": text})
        if limit:
            budget -= len(text)
            if budget <= 0:
                break
    return out


# OpenAI's content parts that carry text; any other part (image_url, input_audio, file) is refused by
# name: the model takes text, and training on a part's repr (as once happened) teaches nothing.
_TEXT_PARTS = ("text", "input_text", "output_text")


def _content_text(content: Any) -> Any:
    """A turn's content as text: a string as it is; OpenAI's list of parts
    ([{"type": "text", "text": ...}, ...], or bare strings) as its text parts joined by newlines."""
    if not isinstance(content, list | dict):
        return content
    parts = [content] if isinstance(content, dict) else content
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, dict) and (kind in _TEXT_PARTS or (kind is None and isinstance(part.get("text"), str))):
            texts.append(part.get("text") or "")
            continue
        what = (
            f"a part of type {kind!r}"
            if kind
            else ("a part without a 'type'" if isinstance(part, dict) else f"a part that is {_kind(part)}")
        )
        raise RowFault(f"a turn's content holds {what}; this run trains on text only: drop those rows or keep their text parts")
    return "\n".join(texts)
