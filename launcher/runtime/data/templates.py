"""Templates: role columns → token ids and labels, prompt tokens masked (IGNORE_INDEX).

- instruction: `### Instruction:` prompt, `### Response:` answer.
- alpaca: the Stanford Alpaca prompt, with or without the `input` paragraph.
- chat: the tokenizer's chat template (or data.chat_template). The conversation is rendered once
  and tokenised once; a token is trained on when it starts inside an assistant turn, found by
  rendering each prefix (with and without the generation prompt) as text.
- text: everything is trained on. Classification: [bos] text, no labels (the class is per row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from launcher.runtime.data.core import IGNORE_INDEX, DataError

_ALPACA_HEAD = "Below is an instruction that describes a task{paired}. Write a response that appropriately completes the request.\n\n"
_ALPACA_INPUT = ", paired with an input that provides further context"


def instruction_prompt(prompt: str) -> str:
    """The `instruction` template's text before the response (also used to prompt at eval)."""
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The Stanford Alpaca prompt: the input paragraph only when the row has an input."""
    if context:
        head = _ALPACA_HEAD.format(paired=_ALPACA_INPUT)
        return f"{head}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"{_ALPACA_HEAD.format(paired='')}### Instruction:\n{instruction}\n\n### Response:\n"


def chat_template(setting: str, tokenizer: Any, tokenizer_dir: Path | str) -> str:
    """The Jinja template chat rows use: data.chat_template (a file or inline), else the tokenizer's."""
    if setting:
        if "{{" in setting or "{%" in setting:
            return setting
        path = Path(setting).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.chat_template: {setting}: no such file; give a Jinja file or an inline template ('{{% for m in messages %}}...')"
            )
        return path.read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise DataError(
            f"data.chat_template: the tokenizer in {tokenizer_dir} has no chat template; "
            "set data.chat_template to a Jinja file or an inline template, or use data.template: instruction|alpaca|text"
        )
    return str(own)


def prompt_parts(template: str, batch: dict[str, list[Any]], i: int) -> tuple[str, str]:
    """(prompt text, response text) of row i for the prompt/response templates."""
    if template == "alpaca":
        context = batch["input"][i] if "input" in batch else ""
        return alpaca_prompt(batch["instruction"][i], context), batch["output"][i]
    return instruction_prompt(batch["prompt"][i]), batch["response"][i]


def render_chat(messages: list[dict[str, str]], tokenizer: Any, template: str) -> tuple[str, list[int]]:
    """The rendered conversation and the char boundaries [start, end, start, end, ...] of assistant turns."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template))

    bounds: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:i], generation_prompt=True)
            _check_prefix(done, header)
            bounds.append(len(header))
            done = header
        full = render(messages[: i + 1])
        _check_prefix(done, full)
        if message["role"] == "assistant":
            bounds.append(len(full))
        done = full
    return done, bounds


def _check_prefix(prefix: str, full: str) -> None:
    if not full.startswith(prefix):
        raise DataError(
            "data.chat_template: the chat template renders a conversation prefix differently from the whole; "
            "prompts cannot be masked exactly (give a template whose turns only append, via data.chat_template)"
        )


def tokenize_batch(batch: dict[str, list[Any]], template: str, tokenizer: Any, settings: dict[str, Any]) -> dict[str, list[Any]]:
    """Batched map: role columns → input_ids, labels, length, targets (labels after the first), overlong."""
    max_len, drop, on_prompt = settings["max_seq_len"], settings["drop_longer"], settings["train_on_prompt"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    if template == "classification":
        for tokens in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.append(bos + tokens)
            labels.append([IGNORE_INDEX] * len(ids[-1]))
    elif template == "text":
        for tokens in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.append(bos + tokens + eos)
            labels.append(list(ids[-1]))
    elif template == "chat":
        rendered = [render_chat(m, tokenizer, settings["chat_template"]) for m in batch["messages"]]
        encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for tokens, offsets, (_, bounds) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered, strict=True):
            starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
            trained = np.searchsorted(np.asarray(bounds, dtype=np.int64), starts, side="right") % 2 == 1
            ids.append(list(tokens))
            labels.append(list(tokens) if on_prompt else np.where(trained, tokens, IGNORE_INDEX).tolist())
    else:
        parts = [prompt_parts(template, batch, i) for i in range(len(next(iter(batch.values()))))]
        prompts = tokenizer([p for p, _ in parts], add_special_tokens=False)["input_ids"]
        answers = tokenizer([a for _, a in parts], add_special_tokens=False)["input_ids"]
        for prompt, answer in zip(prompts, answers, strict=True):
            head, tail = bos + prompt, answer + eos
            ids.append(head + tail)
            labels.append(ids[-1] if on_prompt else [IGNORE_INDEX] * len(head) + tail)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "targets": [], "overlong": []}
    for row_ids, row_labels in zip(ids, labels, strict=True):
        overlong = len(row_ids) > max_len
        if overlong and (drop and template != "classification"):
            row_ids, row_labels = [], []  # dropped later; keep no tokens for it
        elif overlong:
            row_ids, row_labels = row_ids[:max_len], row_labels[:max_len]
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["length"].append(len(row_ids))
        # The loss's shift rule: a document's first label is never a target.
        out["targets"].append(1 if template == "classification" else sum(label != IGNORE_INDEX for label in row_labels[1:]))
        out["overlong"].append(overlong)
    return out


def tokenize_features(template: str) -> Any:
    from datasets import Features, List, Value

    cols: dict[str, Any] = {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "length": Value("int32"),
        "targets": Value("int32"),
        "overlong": Value("bool"),
    }
    if template == "classification":
        cols["label"] = Value("string")
    return Features(cols)


def eval_prompt(template: str, row: dict[str, Any], tokenizer: Any, chat: str) -> dict[str, Any] | None:
    """A held-out prompt and its answer, for exact-match evaluation (None: not a prompt/answer row)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if template in ("instruction", "alpaca"):
        prompt, answer = prompt_parts(template, {k: [v] for k, v in row.items()}, 0)
        return {"prompt_ids": bos + tokenizer.encode(prompt, add_special_tokens=False), "answer": answer}
    if template == "chat":
        messages = row["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            return None
        text = str(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=chat))
        return {"prompt_ids": tokenizer(text, add_special_tokens=False)["input_ids"], "answer": messages[-1]["content"]}
    return None
