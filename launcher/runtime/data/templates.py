"""Templates: role columns → token ids and labels, prompt tokens masked (IGNORE_INDEX).

- instruction: `### Instruction:` prompt, `### Response:` answer.
- alpaca: the Stanford Alpaca prompt, with or without the `input` paragraph.
- chat: the tokenizer's chat template (or data.chat_template). The conversation is rendered once
  and tokenised once; a token is trained on when it starts inside an assistant turn, found by
  rendering each prefix (with and without the generation prompt) as text.
- text: everything is trained on. Classification: [bos] text, no labels (the class is per row).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from launcher.runtime.data.core import IGNORE_INDEX, DataError

_ALPACA_HEAD = "Below is an instruction that describes a task{paired}. Write a response that appropriately completes the request.\n\n"
_ALPACA_INPUT = ", paired with an input that provides further context"
# A chat template renders a row in microseconds; one still busy after this long loops without bound
# (Jinja's sandbox caps one range() at 100,000, not nested ones).
RENDER_SECONDS = 2.0


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
    """The Jinja template chat rows use: data.chat_template (a file or inline), else the tokenizer's.
    A template that does not compile is refused here, naming where it came from."""
    if setting:
        if "{{" in setting or "{%" in setting:
            return _compiled(setting, "data.chat_template (inline)")
        path = Path(setting).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.chat_template: {setting}: no such file; give a Jinja file or an inline template ('{{% for m in messages %}}...')"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data.chat_template: {path} cannot be read ({type(exc).__name__}); give a UTF-8 Jinja file") from None
        return _compiled(text, f"data.chat_template ({path})")
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise DataError(
            f"data.chat_template: the tokenizer in {tokenizer_dir} has no chat template; "
            "set data.chat_template to a Jinja file or an inline template, or use data.template: instruction|alpaca|text"
        )
    if not isinstance(own, str):
        raise DataError(
            f"{tokenizer_dir}: the tokenizer has several named chat templates ({', '.join(map(str, own))}); "
            "choose one with data.chat_template (a file or an inline template)"
        )
    return _compiled(own, f"the chat template of the tokenizer in {tokenizer_dir}")


def _compiled(template: str, where: str) -> str:
    """`template` once Jinja has compiled it (as transformers will), else one line naming `where`."""
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper: if it moves, the first render reports the error
        return template
    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        at = f" (line {line})" if line else ""
        raise DataError(f"{where}: is not a valid Jinja template{at}: {str(exc).splitlines()[0][:200]}; fix the template") from None
    return template


def prompt_parts(template: str, batch: dict[str, list[Any]], i: int) -> tuple[str, str]:
    """(prompt text, response text) of row i for the prompt/response templates."""
    if template == "alpaca":
        context = batch["input"][i] if "input" in batch else ""
        return alpaca_prompt(batch["instruction"][i], context), batch["output"][i]
    return instruction_prompt(batch["prompt"][i]), batch["response"][i]


class ChatRenderer:
    """Renders conversations as text with a chat template. transformers' apply_chat_template costs
    ~250 µs a call in argument handling; the compiled template (the same one it caches) renders in a
    fraction of that. The first renders are compared with apply_chat_template itself, and any
    difference falls back to it for good, so the fast path can never change the text."""

    CHECKS = 8

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer, self.template, self.checks = tokenizer, template, 0
        self.compiled: Any = None
        try:  # a private helper: if it moves, the public path still works
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(template)
        except Exception:
            self.compiled = None
        self.extra = dict(getattr(tokenizer, "special_tokens_map", {}))

    def slow(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template
            )
        )

    def __call__(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if self.compiled is None:
            return self.slow(messages, generation_prompt)
        text = str(self.compiled.render(messages=messages, add_generation_prompt=generation_prompt, **self.extra))
        if self.checks < self.CHECKS:
            self.checks += 1
            reference = self.slow(messages, generation_prompt)
            if reference != text:
                self.compiled = None
                return reference
        return text


def render_chat(messages: list[dict[str, str]], render: ChatRenderer) -> tuple[str, list[int]]:
    """The rendered conversation and the char boundaries [start, end, start, end, ...] of assistant
    turns. Rendered only around assistant turns (and once whole): each render must extend the last."""
    bounds: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:i], generation_prompt=True)
            _check_prefix(done, header)
            done = render(messages[: i + 1])
            _check_prefix(header, done)
            bounds += [len(header), len(done)]
    if not messages or messages[-1]["role"] != "assistant":
        full = render(messages)
        _check_prefix(done, full)
        done = full
    return done, bounds


def _check_prefix(prefix: str, full: str) -> None:
    if not full.startswith(prefix):
        raise DataError(
            "data.chat_template: the chat template renders a conversation prefix differently from the whole; "
            "prompts cannot be masked exactly (give a template whose turns only append, via data.chat_template)"
        )


def encode(tokenizer: Any, texts: list[str], offsets: bool = False) -> tuple[list[list[int]], list[Any] | None]:
    """Token ids (and char offsets) without special tokens: the Rust tokenizer directly when it can
    be (the Python wrapper's per-row conversion costs as much as the tokenising)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        encoded = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encoded], ([e.offsets for e in encoded] if offsets else None)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return out["input_ids"], (out["offset_mapping"] if offsets else None)


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())), lengths


def tokenize_batch(batch: dict[str, list[Any]], template: str, tokenizer: Any, settings: dict[str, Any]) -> Any:
    """Batched map: role columns → an Arrow table of input_ids, labels, length, targets (labels at
    index >= 1: the loss's shift rule), overlong. Per-token work is numpy over the flat batch."""
    import pyarrow as pa

    if template == "preference":
        from launcher.runtime.data.pairs import tokenize_pairs

        return tokenize_pairs(batch, tokenizer, settings)
    max_len, drop, on_prompt = settings["max_seq_len"], settings["drop_longer"], settings["train_on_prompt"]
    refused = [""] * len(next(iter(batch.values()), []))  # why a row cannot be rendered (else "")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    prompt_len: np.ndarray | None = None
    chat_labels: list[np.ndarray] = []
    if template in ("classification", "text"):
        tail = eos if template == "text" else []
        rows = [bos + tokens + tail for tokens in encode(tokenizer, batch["text"])[0]]
    elif template == "chat":
        render = ChatRenderer(tokenizer, settings["chat_template"])
        rendered = []
        with _time_bound() as bound:
            for i, messages in enumerate(batch["messages"]):
                with bound(batch["_row"][i] + 1 if "_row" in batch else i + 1):
                    try:
                        rendered.append(render_chat(messages, render))
                    except DataError:
                        raise
                    except Exception as exc:  # the template refused this conversation (raise_exception, a bad field)
                        rendered.append(("", []))
                        refused[i] = f"the chat template refused it: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        rows, offsets = encode(tokenizer, [text for text, _ in rendered], offsets=True)
        for tokens, spans, (_, bounds) in zip(rows, offsets or [], rendered, strict=True):
            starts = np.fromiter(chain.from_iterable(spans), dtype=np.int64, count=2 * len(spans))[::2]
            trained = np.searchsorted(np.asarray(bounds, dtype=np.int64), starts, side="right") % 2 == 1
            chat_labels.append(np.where(trained, np.asarray(tokens, dtype=np.int64), IGNORE_INDEX))
    else:
        parts = [prompt_parts(template, batch, i) for i in range(len(next(iter(batch.values()))))]
        prompts = encode(tokenizer, [p for p, _ in parts])[0]
        answers = encode(tokenizer, [a for _, a in parts])[0]
        rows = [bos + prompt + answer + eos for prompt, answer in zip(prompts, answers, strict=True)]
        prompt_len = np.fromiter((len(bos) + len(prompt) for prompt in prompts), dtype=np.int64, count=len(prompts))
    ids, lengths = _flat(rows)
    n = len(lengths)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)  # position inside the row
    if template == "classification":
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    elif on_prompt or template == "text":
        labels = ids.copy()
    elif template == "chat":
        labels = np.concatenate(chat_labels) if chat_labels else ids.copy()
    else:
        assert prompt_len is not None
        labels = np.where(within < np.repeat(prompt_len, lengths), IGNORE_INDEX, ids)
    invalid = np.fromiter(map(bool, refused), dtype=bool, count=n)
    overlong = (lengths > max_len) & ~invalid
    # Dropped rows keep no tokens (they leave at the next step); truncated ones keep max_len.
    kept = np.where(overlong, 0 if drop and template != "classification" else max_len, np.where(invalid, 0, lengths))
    mask = within < np.repeat(kept, lengths)
    ids, labels, row = ids[mask], labels[mask], np.repeat(np.arange(n), lengths)[mask]
    is_target = (within[mask] >= 1) & (labels != IGNORE_INDEX)
    targets = np.ones(n, dtype=np.int64) if template == "classification" else np.bincount(row[is_target], minlength=n)
    bounds32 = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
    columns = {
        "input_ids": pa.ListArray.from_arrays(pa.array(bounds32), pa.array(ids.astype(np.int32))),
        "labels": pa.ListArray.from_arrays(pa.array(bounds32), pa.array(labels.astype(np.int32))),
        "length": pa.array(kept.astype(np.int32)),
        "targets": pa.array(targets.astype(np.int32)),
        "overlong": pa.array(overlong),
        "invalid": pa.array(refused, type=pa.string()),
    }
    if template == "classification":
        columns["label"] = pa.array(batch["label"], type=pa.string())
    return pa.table(columns)


class _Unbounded(BaseException):
    """SIGALRM inside a template render: a BaseException, so no `except Exception` on the way swallows it."""


@contextmanager
def _time_bound() -> Iterator[Any]:
    """`bound(row)`: a context in which rendering must end within RENDER_SECONDS, else one DataError
    naming the row. A timer signal, so only where signals can be handled (the main thread: the
    preparing process, or a datasets worker); elsewhere rendering runs unbounded."""

    @contextmanager
    def unbounded(row: int) -> Iterator[None]:
        yield

    if threading.current_thread() is not threading.main_thread():
        yield unbounded
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _Unbounded

    @contextmanager
    def bound(row: int) -> Iterator[None]:
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
        try:
            yield
        except _Unbounded:
            raise DataError(
                f"data.chat_template: rendering row {row} took over {RENDER_SECONDS:g} s; the template does not finish "
                "(a loop without bound?): fix it, or set data.chat_template to one that only loops over the messages"
            ) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        yield bound
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tokenize_features(template: str) -> Any:
    from datasets import Features, List, Value

    cols: dict[str, Any] = {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "length": Value("int32"),
        "targets": Value("int32"),
        "overlong": Value("bool"),
        "invalid": Value("string"),
    }
    if template == "classification":
        cols["label"] = Value("string")
    if template == "preference":  # a pair: chosen then rejected, `split` tokens of chosen
        cols["split"] = Value("int32")
        cols["identical"] = Value("bool")
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
