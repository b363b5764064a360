"""Preference pairs as users have them, each prepared through the real pipeline (task: preference) and
checked token by token: TRL's text and conversational formats, UltraFeedback-binarized (a text
prompt beside whole conversations: the prompt turn once, not scored) and TRL's implicit prompt (no
prompt column), all against TRL's own prompt extraction, and `data.columns` mapping other names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config import load_config
from launcher.runtime.data import IGNORE_INDEX
from launcher.runtime.data.packing import TokenData, prepare_data
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model())


def _prepared(tmp_path: Path, row: dict[str, Any], *overrides: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """(chosen ids, chosen labels, rejected ids, rejected labels) of the one pair prepared from `row`."""
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps(row) + "\n")
    data = load_config(ROOT / "recipes" / "tiny-cpu-dpo.yaml", [f"data.path={source}", "data.val_fraction=0", *overrides]).data
    folder = prepare_data(data, str(source), ensure_tiny_model(), tmp_path / "cache", seed=1, task="preference")
    train = TokenData(folder, "train")
    assert len(train) == 1
    ids, labels = [int(t) for t in train.input_ids], [int(t) for t in train.labels]
    chosen = int(train.doc_lengths[0])
    return ids[:chosen], labels[:chosen], ids[chosen:], labels[chosen:]


def _expected(tokenizer: Any, prompt: Any, response: Any) -> tuple[list[int], list[int]]:
    """TRL's DPOTrainer tokenisation of an explicit prompt and response: ids and the scored labels."""
    if isinstance(prompt, list):
        head = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
        whole = list(tokenizer.apply_chat_template(prompt + response, tokenize=True)["input_ids"])
    else:
        head = tokenizer(prompt)["input_ids"]
        whole = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    cut = next(i for i, (a, b) in enumerate(zip([*head, None], whole, strict=False)) if a != b)
    return whole, [IGNORE_INDEX] * cut + whole[cut:]


ULTRAFEEDBACK = {"prompt": "copy: cat dog", "chosen": _turns("copy: cat dog", "cat dog"), "rejected": _turns("copy: cat dog", "cat")}
CASES = {
    "text": ({"prompt": "copy: cat dog\n", "chosen": "cat dog", "rejected": "dog cat"}, ()),
    "conversational": (
        {"prompt": _turns("copy: cat dog", "")[:1], "chosen": _turns("", "cat dog")[1:], "rejected": _turns("", "cat")[1:]},
        (),
    ),
    "ultrafeedback-binarized": (ULTRAFEEDBACK, ()),
    "implicit prompt, conversations": ({"chosen": ULTRAFEEDBACK["chosen"], "rejected": ULTRAFEEDBACK["rejected"]}, ()),
    "implicit prompt, text": ({"chosen": "copy: cat dog\ncat dog", "rejected": "copy: cat dog\ndog cat"}, ()),
    "columns mapped": (
        {"question": "copy: cat dog\n", "good": "cat dog", "bad": "dog cat"},
        ("data.columns={prompt: question, chosen: good, rejected: bad}",),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_pair_is_tokenised_as_trl_does(case: str, tmp_path: Path, tokenizer: Any) -> None:
    from trl.data_utils import extract_prompt, maybe_extract_prompt

    row, overrides = CASES[case]
    if case == "columns mapped":
        trl_row = {"prompt": row["question"], "chosen": row["good"], "rejected": row["bad"]}
    else:  # what TRL trains on: the prompt taken out of the responses where the row holds it there
        trl_row = maybe_extract_prompt(row) if "prompt" in row else extract_prompt(row)
    chosen_ids, chosen_labels, rejected_ids, rejected_labels = _prepared(tmp_path, row, *overrides)
    assert (chosen_ids, chosen_labels) == _expected(tokenizer, trl_row["prompt"], trl_row["chosen"])
    assert (rejected_ids, rejected_labels) == _expected(tokenizer, trl_row["prompt"], trl_row["rejected"])
    shown = tokenizer.decode(chosen_ids)
    assert shown.count("copy: cat dog") == 1, shown  # UltraFeedback's question once, never a response
    scored = tokenizer.decode([t for t in chosen_labels if t != IGNORE_INDEX])
    assert "copy" not in scored and "cat dog" in scored, scored
