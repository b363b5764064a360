"""CPU tiny-model mode, fully offline: a synthetic task set, a BPE tokenizer trained on it, and a
small Llama (the shape in config/resolve.py TINY_LLAMA), saved as a normal Hugging Face model
directory in the cache. Everything is deterministic: the same files on every machine and run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from launcher.config.resolve import TINY_LLAMA

TINY_VERSION = "v2"  # bump when the task set, tokenizer or model recipe changes
TASKS_NAME = "tiny-tasks"
N_TASKS = 12000
SENTIMENT_NAME = "tiny-sentiment"
N_SENTIMENT = 4000
PREFERENCES_NAME = "tiny-preferences"
PREFERENCES_VERSION = "v4"  # v4: a copy's or reversal's near miss stops after a word (v3: reordered, stayed at chance)
N_PREFERENCES = 3000

_WORDS = (
    "cat dog fox owl bee ant elk yak emu cow pig hen bat rat eel cod jay ram ewe doe "
    "red blue green black white pink gray gold teal navy plum rose sand snow rust mint "
    "sun moon star rain wind fire ice rock tree leaf seed root fern moss lake sea hill "
    "cup pen box key map bag hat car bus cap jar pot pan mug fan lamp door desk bell "
    "run sit jump swim read walk talk sing play cook draw fly dig hop nap"
).split()
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("LAUNCHER_CACHE_DIR") or Path.home() / ".cache" / "launcher")


def tiny_model_dir() -> Path:
    return cache_dir() / f"tiny-llama-{TINY_VERSION}"


def tiny_tasks_path() -> Path:
    return cache_dir() / f"{TASKS_NAME}-{TINY_VERSION}.jsonl"


def make_task(rng: random.Random) -> dict[str, str]:
    """One instruction/response pair from a small family of learnable tasks."""
    kind = rng.choice(["copy", "reverse", "sort", "add", "last", "count"])
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
    if kind == "copy":
        return {"prompt": "copy: " + " ".join(words), "response": " ".join(words)}
    if kind == "reverse":
        return {"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))}
    if kind == "last":
        return {"prompt": "last word of: " + " ".join(words), "response": words[-1]}
    if kind == "count":
        return {"prompt": "count words: " + " ".join(words), "response": str(len(words))}
    if kind == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        return {"prompt": "sort: " + " ".join(digits), "response": " ".join(sorted(digits))}
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"prompt": f"add: {a} + {b}", "response": str(a + b)}


def tiny_tasks(n: int = N_TASKS, seed: int = 0) -> list[dict[str, str]]:
    """The shipped task set (duplicates included on purpose: the cleaning step removes them)."""
    rng = random.Random(seed)
    return [make_task(rng) for _ in range(n)]


_SUBJECTS = ("the movie", "the food", "the service", "the book", "the show", "the trip", "the song", "the game")
_POSITIVE = ("good", "great", "fun", "nice", "lovely", "superb")
_NEGATIVE = ("bad", "awful", "dull", "boring", "poor", "terrible")


def tiny_sentiment(n: int = N_SENTIMENT, seed: int = 0) -> list[dict[str, str]]:
    """Short reviews whose label is the adjective's polarity flipped by a negation ("was not bad" is
    positive). Half the rows are negated and half the adjectives are positive, independently, so a
    classifier that reads only the adjective, or only the negation, scores exactly chance (50 %):
    accuracy above that proves it combines the two."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        words = [rng.choice(_SUBJECTS), rng.choice(("was", "is", "felt", "seemed"))]
        words += ["not"] if negated else []
        words += [rng.choice(("very", "really", "quite"))] if rng.random() < 0.4 else []
        words.append(rng.choice(_POSITIVE if positive else _NEGATIVE))
        words += [rng.choice(("at all", "today", "to me"))] if rng.random() < 0.3 else []
        rows.append({"text": " ".join(words), "label": "positive" if positive != negated else "negative"})
    return rows


def _wrong(task: dict[str, str], rng: random.Random) -> str:
    """A plausible wrong answer to a task: a count off by a little, a sum's operand, a copy or reversal
    stopped after its first word, the other tasks' words unchanged, reordered or cut to the first.
    What DPO from the untrained tiny model could not learn in a few hundred pairs stayed at chance, so
    it is left out: sums off by one (v2), a copy reversed or a reversal left as it was (v3), a copy or
    reversal with one word dropped or said twice."""
    answer, prompt = task["response"], task["prompt"]
    if prompt.startswith("add: "):
        operands = [o for o in prompt.removeprefix("add: ").split(" + ") if o != answer]
        return rng.choice(operands) if operands else str(int(answer) + 1)
    if answer.isdigit():
        return str(int(answer) + rng.choice((-2, -1, 1, 2, 10)))
    if prompt.startswith(("copy: ", "reverse: ")):
        return answer.split()[0]
    words = prompt.split(": ", 1)[1].split()
    candidates = [" ".join(words), " ".join(reversed(words)), " ".join(sorted(words)), words[0]]
    wrong = [c for c in candidates if c != answer]
    return rng.choice(wrong) if wrong else answer + " " + answer


def tiny_preferences(n: int = N_PREFERENCES, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs over the tiny tasks (TRL's text format: the prompt ends where the answer's
    leading space begins): the right answer is chosen, a near miss rejected. A tiny model prefers the
    right one on held-out pairs after a few dozen DPO steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = make_task(rng)
        rows.append({"prompt": task["prompt"] + "\n", "chosen": task["response"], "rejected": _wrong(task, rng)})
    return rows


def _ensure_jsonl(path: Path, rows: Callable[[], list[dict[str, str]]]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(row) + "\n" for row in rows()))
                os.replace(tmp, path)
    return path


def ensure_tiny_tasks() -> Path:
    return _ensure_jsonl(tiny_tasks_path(), tiny_tasks)


def ensure_tiny_sentiment() -> Path:
    return _ensure_jsonl(cache_dir() / f"{SENTIMENT_NAME}-{TINY_VERSION}.jsonl", tiny_sentiment)


def shipped_data(name: str) -> Path | None:
    """The local file behind a shipped synthetic data set name, or None for any other path."""
    builders = {
        TASKS_NAME: ensure_tiny_tasks,
        SENTIMENT_NAME: ensure_tiny_sentiment,
        PREFERENCES_NAME: lambda: _ensure_jsonl(cache_dir() / f"{PREFERENCES_NAME}-{PREFERENCES_VERSION}.jsonl", tiny_preferences),
    }
    return builders[name]() if name in builders else None


def _corpus() -> list[str]:
    lines = [f"{t['prompt']}\n{t['response']}" for t in tiny_tasks()]
    lines += [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)] * 20
    lines += ["### Instruction:\n", "\n\n### Response:\n", "<|user|>\n", "<|assistant|>\n", "<|end|>\n"] * 50
    return lines


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one: arithmetic stays learnable for a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=2048)
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # save_pretrained imports DeepSpeed, which would warn

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=TINY_LLAMA["vocab_size"],
        hidden_size=TINY_LLAMA["hidden_size"],
        intermediate_size=TINY_LLAMA["intermediate_size"],
        num_hidden_layers=TINY_LLAMA["num_layers"],
        num_attention_heads=TINY_LLAMA["num_attention_heads"],
        num_key_value_heads=TINY_LLAMA["num_key_value_heads"],
        tie_word_embeddings=bool(TINY_LLAMA["tie_word_embeddings"]),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.save_pretrained(path, safe_serialization=True)


_TINY_FILES = ("COMPLETE", "config.json", "model.safetensors", "tokenizer.json")


def ensure_tiny_model() -> Path:
    """Build the tiny model directory once (under a file lock: several ranks may ask at once)."""
    path = tiny_model_dir()
    if all((path / name).exists() for name in _TINY_FILES):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if all((path / name).exists() for name in _TINY_FILES):
            return path
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        build_tokenizer(tmp)
        build_model(tmp)
        (tmp / "COMPLETE").write_text(TINY_VERSION + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path
