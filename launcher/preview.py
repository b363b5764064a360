"""`launcher preview RECIPE`: the first training rows as the ranks will see them, decoded token by
token, with the tokens the loss trains on marked (green on a terminal, `[[...]]` otherwise).

The data is prepared exactly as `launcher prepare` prepares it (the same cache); rows are taken in
the training order (GlobalOrder), packed documents shown one by one. No torch is imported: the
tokenizer is read with `tokenizers` (transformers only for a model without tokenizer.json).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.config.errors import one_line

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


class _Decoder:
    """Token ids → text, one token at a time or a run of them (spaces kept at a run's start)."""

    def __init__(self, model_path: Path) -> None:
        if (model_path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(model_path / "tokenizer.json"))
            self._decode = lambda ids: fast.decode(ids, skip_special_tokens=False)
        else:
            from transformers import AutoTokenizer

            slow = AutoTokenizer.from_pretrained(model_path)
            self._decode = lambda ids: str(slow.decode(ids, skip_special_tokens=False))

    def __call__(self, ids: list[int], before: int | None = None) -> str:
        """The text of `ids`; given the token `before` them, as it reads after it (a leading space kept)."""
        if before is None:
            return str(self._decode(ids))
        head, whole = str(self._decode([before])), str(self._decode([before, *ids]))
        return whole[len(head) :] if whole.startswith(head) else str(self._decode(ids))


def examples(cfg: RunConfig, count: int) -> dict[str, Any]:
    """The data report and the first `count` training rows: per document, its tokens (id, text,
    trained); a classification row's label."""
    import numpy as np

    from launcher.runtime.__main__ import prepare
    from launcher.runtime.data.packing import GlobalOrder, TokenData
    from launcher.runtime.data.report import lines
    from launcher.runtime.model.files import model_dir

    folder = prepare(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    data = TokenData(folder, "train")
    decode = _Decoder(model_dir(cfg.model))
    labels = meta.get("labels") or []
    order = GlobalOrder(len(data), cfg.run.seed)
    rows = []
    for position in range(min(count, len(data))):
        row = order.row(position)
        start = int(data.offsets[row])
        ids = np.asarray(data.input_ids[start : int(data.offsets[row + 1])]).tolist()
        trained = (np.asarray(data.target_mask[start : start + len(ids)]) != 0).tolist()
        documents, at = [], 0
        for size in np.asarray(data.doc_lengths[data.doc_offsets[row] : data.doc_offsets[row + 1]]).tolist():
            span = range(at, at + int(size))
            documents.append([{"id": ids[i], "text": decode([ids[i]]), "trained": bool(trained[i])} for i in span])
            at += int(size)
        example: dict[str, Any] = {"position": position, "row": row, "tokens": len(ids), "trained": int(sum(trained))}
        if data.classes is not None:
            index = int(data.classes[row])
            example["label"] = labels[index] if 0 <= index < len(labels) else index
        example["documents"] = documents
        rows.append(example)
    return {"report": lines(meta), "rows": len(data), "cache": str(folder), "examples": rows, "_decode": decode}


def _spans(document: list[dict[str, Any]]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens with the same `trained`, as (trained, ids)."""
    spans: list[tuple[bool, list[int]]] = []
    for token in document:
        if spans and spans[-1][0] == token["trained"]:
            spans[-1][1].append(token["id"])
        else:
            spans.append((token["trained"], [token["id"]]))
    return spans


def _safe(text: str) -> str:
    """Control characters escaped, line breaks kept: a row's escape sequence cannot drive the terminal."""
    return "\n".join(one_line(line) for line in text.split("\n"))


def render(found: dict[str, Any], colour: bool) -> str:
    """The report lines, then each row: a header, and each document with its trained spans marked."""
    decode = found["_decode"]
    out = list(found["report"])
    for example in found["examples"]:
        docs = example["documents"]
        # classification trains on the label, read at the last token: no token is marked
        what = f"label {_safe(str(example['label']))}" if "label" in example else f"{example['trained']} trained on"
        head = (
            f"--- example {example['position'] + 1} (row {example['row']} of {found['rows']}): {len(docs)} document(s), "
            f"{example['tokens']} tokens, {what}"
        )
        out.append("")
        out.append(f"{BOLD}{head}{RESET}" if colour else head)
        for n, document in enumerate(docs):
            if len(docs) > 1:
                marker = f"--- document {n + 1} of {len(docs)} (packed: attends only to itself)"
                out.append(f"{DIM}{marker}{RESET}" if colour else marker)
            text, before = "", None
            for trained, ids in _spans(document):
                piece = _safe(decode(ids, before))
                before = ids[-1]
                if colour:
                    text += f"{GREEN if trained else DIM}{piece}{RESET}"
                else:
                    text += f"[[{piece}]]" if trained else piece
            out.append(text)
    if not colour and not any("label" in example for example in found["examples"]):
        out.append("")
        out.append("[[...]]: tokens the loss trains on; the rest is context")
    return "\n".join(out)


def preview(cfg: RunConfig, count: int, as_json: bool) -> int:
    """Print the first `count` prepared training rows (text, or JSON with --json)."""
    from launcher.runtime.data import DataError
    from launcher.runtime.model.files import ModelError

    try:
        found = examples(cfg, count)
    except (DataError, ModelError) as exc:
        print(one_line(f"error: {exc}"), file=sys.stderr)
        return 2
    text = (
        json.dumps({k: v for k, v in found.items() if not k.startswith("_")}, indent=1) if as_json else render(found, sys.stdout.isatty())
    )
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `launcher preview R | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush stays quiet
    return 0
