"""`launcher generate RUN --prompts FILE` and `launcher chat RUN`: answers from a trained checkpoint.

The checkpoint is exported (runtime/state/export.py, into a temporary folder: the same tensors and
names `launcher export` writes) and loaded with transformers, the adapter applied with peft for
LoRA, QLoRA and prompt tuning (the base in its own dtype: a QLoRA base is not quantised again).
RUN may also be an exported folder. Generation is greedy, transformers' `generate`.

Prompts are written as the run's data were (runtime/data/templates.py `eval_prompt`): the chat
template (data.chat_template, else the tokenizer's) for data.template: chat, whose conversation
`chat` keeps across turns; the instruction or Alpaca prompt for those templates, a fresh one each
turn (they have no turns); the text itself for data.template: text.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from launcher.config import ConfigError
from launcher.config.errors import Problem


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: str  # chat | instruction | alpaca | text
    chat: str  # the Jinja chat template ("" unless template is chat)
    device: Any


def _problem(where: str, what: str, fix: str) -> ConfigError:
    return ConfigError([Problem(where, what, fix)])


@contextlib.contextmanager
def loaded(run_dir: str, step: int | None, device: str | None) -> Iterator[Loaded]:
    """The run's model at a checkpoint (or an exported folder), ready to generate."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from launcher.runtime.model.build import load_tokenizer

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # export reads the checkpoint without a group, on purpose
    hf_logging.disable_progress_bar()  # the answers are the output
    run = Path(run_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (run / "plan.json").is_file():  # an exported folder
        if not ((run / "config.json").is_file() or (run / "adapter_config.json").is_file()):
            raise _problem(run_dir, "is neither a run directory (plan.json) nor an exported model", "give a run `launcher run` trained in")
        if step is not None:
            raise _problem("--step", "an exported folder holds one model", "leave --step out")
        model = _from_folder(run, dev)
        tokenizer = load_tokenizer(run if (run / "tokenizer_config.json").is_file() else Path(model.config.name_or_path))
        own = getattr(tokenizer, "chat_template", None)
        yield Loaded(model, tokenizer, "chat" if isinstance(own, str) else "text", own if isinstance(own, str) else "", dev)
        return
    from launcher.plan import Plan
    from launcher.runtime.data.templates import chat_template
    from launcher.runtime.model.files import model_dir
    from launcher.runtime.state.export import export

    cfg = Plan.load(run / "plan.json").run_config
    if cfg.task != "causal_lm":
        raise _problem(run_dir, f"is a {cfg.task} run: it does not generate text", f"use `launcher eval {run_dir}` for its metrics")
    base = model_dir(cfg.model)
    with tempfile.TemporaryDirectory(prefix="launcher-try-") as tmp:
        from launcher.runtime.state.export import ExportError

        try:
            export(run, Path(tmp), step, merge=False)
        except ExportError as exc:
            raise _problem("--step" if step is not None else run_dir, str(exc), "choose a saved step") from None
        model = _from_folder(Path(tmp), dev)
    tokenizer = load_tokenizer(base)
    template = cfg.data.template
    chat = chat_template(cfg.data.chat_template, tokenizer, base) if template == "chat" else ""
    yield Loaded(model, tokenizer, template, chat, dev)


def _from_folder(folder: Path, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    return model.to(device).eval()


def prompt_ids(lm: Loaded, messages: list[dict[str, str]]) -> list[int]:
    """Token ids that ask for the next assistant turn, written as the run's data were."""
    from launcher.runtime.data.templates import eval_prompt

    tokenizer = lm.tokenizer
    last = messages[-1]["content"]
    if lm.template == "chat":
        row: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    elif lm.template == "alpaca":
        row = {"instruction": last, "input": "", "output": ""}
    elif lm.template == "instruction":
        row = {"prompt": last, "response": ""}
    else:  # plain text: continue it
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + list(tokenizer.encode(last, add_special_tokens=False))
    found = eval_prompt(lm.template, row, tokenizer, lm.chat)
    assert found is not None
    return list(found["prompt_ids"])


def reply(lm: Loaded, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The model's greedy answer to the conversation so far, up to its end token."""
    import torch

    tokenizer = lm.tokenizer
    ids = torch.tensor([prompt_ids(lm, messages)], device=lm.device)
    stops = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")} if isinstance(t, int) and t >= 0]
    unk = tokenizer.unk_token_id
    stops = [t for t in stops if t != unk or unk is None]
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0,
        )
    new = out[0, ids.shape[1] :].tolist()
    cut = next((i for i, tok in enumerate(new) if tok in stops), len(new))
    return str(tokenizer.decode(new[:cut], skip_special_tokens=True)).strip()


def read_prompts(path: str) -> list[list[dict[str, str]]]:
    """A prompts file: JSON lines with `prompt` (or `instruction`, `text`) or `messages`, or plain lines of text."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _problem("--prompts", f"{path}: cannot be read ({exc.__class__.__name__})", "give a UTF-8 file, one prompt a line") from None
    prompts: list[list[dict[str, str]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line
        if isinstance(row, str):
            prompts.append([{"role": "user", "content": row}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append([{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in row["messages"]])
        elif isinstance(row, dict) and any(isinstance(row.get(k), str) for k in ("prompt", "instruction", "text")):
            text = next(row[k] for k in ("prompt", "instruction", "text") if isinstance(row.get(k), str))
            prompts.append([{"role": "user", "content": text}])
        else:
            raise _problem("--prompts", f"{path} line {number}: no prompt, instruction, text or messages", 'write {"prompt": "..."} a line')
    if not prompts:
        raise _problem("--prompts", f"{path}: holds no prompt", "write one prompt a line")
    return prompts


def generate_run(run_dir: str, prompts_file: str, out: str | None, step: int | None, max_new_tokens: int, device: str | None) -> int:
    """One JSON line per prompt: index, prompt (the conversation's last turn) and output."""
    prompts = read_prompts(prompts_file)
    with loaded(run_dir, step, device) as lm:
        sink: TextIO = open(out, "w", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
        try:
            for index, messages in enumerate(prompts):
                answer = reply(lm, messages, max_new_tokens)
                sink.write(json.dumps({"index": index, "prompt": messages[-1]["content"], "output": answer}) + "\n")
                sink.flush()
        finally:
            if out:
                sink.close()
    if out:
        print(f"launcher: {len(prompts)} answers in {out}")
    return 0


def chat_run(run_dir: str, step: int | None, max_new_tokens: int, device: str | None) -> int:
    """Read a turn a line from stdin (a terminal or a pipe), answer it; /reset forgets, /exit or EOF ends."""
    interactive = sys.stdin.isatty()
    with loaded(run_dir, step, device) as lm:
        if interactive:
            turns = "the conversation is kept" if lm.template == "chat" else f"each line is a new {lm.template} prompt"
            print(f"launcher chat: {run_dir} ({turns}; /reset forgets, /exit or Ctrl-D ends)", file=sys.stderr)
        messages: list[dict[str, str]] = []
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            text = line.strip()
            if text == "/reset":
                messages = []
                continue
            if not text:
                continue
            messages = [*(messages if lm.template == "chat" else []), {"role": "user", "content": text}]
            answer = reply(lm, messages, max_new_tokens)
            messages.append({"role": "assistant", "content": answer})
            print(answer, flush=True)
