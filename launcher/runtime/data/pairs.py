"""Preference pairs → token ids, the way TRL's DPOTrainer makes them, so a run here and there trains
on the same tokens.

Each role arrives as JSON (columns.to_roles): text, or chat messages (TRL's conversational format).
Text: the prompt is tokenised alone and joined with each response (the tokenizer's EOS appended to a
response that lacks it); messages: the chat template renders the prompt with the generation prompt,
and prompt + response whole. Chosen and rejected that are whole conversations beside a text prompt
(UltraFeedback-binarized) or none (TRL's implicit prompt) have their shared opening turns taken as
the prompt (TRL's maybe_extract_prompt), so the question is neither said twice nor scored. The response starts where the prompt's tokens and the whole's part
(TRL's common prefix), and only its tokens are scored. A pair is one row of the Arrow table: the
chosen sequence, then the rejected one (`split` = the chosen one's length); data.max_seq_len
bounds each sequence, as TRL's max_length does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from launcher.runtime.data.core import IGNORE_INDEX


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def implicit_prompt(prompt: Any, chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) with the prompt found where the pair holds it inside its responses
    (TRL's extract_prompt): conversations beside a text prompt or none (`prompt` None: no column)
    give the turns they open with alike; text without a prompt column, the characters they open with
    alike, up to a space (the space stays with the responses). A given conversational prompt is kept."""
    if isinstance(chosen, list) and isinstance(rejected, list) and not isinstance(prompt, list):
        shared = _common_prefix(chosen, rejected)
        if shared or prompt is None:
            return chosen[:shared], chosen[shared:], rejected[shared:]
    elif prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        shared = _common_prefix(chosen, rejected)
        shared -= 1 if 0 < shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " " else 0
        return chosen[:shared], chosen[shared:], rejected[shared:]
    return ("" if prompt is None else prompt), chosen, rejected


def pair_ids(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, chat_template: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen response ids, rejected response ids) of one pair, as TRL tokenises it."""
    prompt, chosen, rejected = implicit_prompt(prompt, chosen, rejected)
    if isinstance(prompt, list) or isinstance(chosen, list):  # conversational
        if not chat_template:
            raise ValueError("the tokenizer has no chat template for these messages; set data.chat_template")
        turns = _as_messages(prompt, "user") if prompt else []

        def render(messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt, chat_template=chat_template
            )
            return list(out["input_ids"])

        prompt_ids = render(turns, generation_prompt=True)
        whole_chosen = render(turns + _as_messages(chosen, "assistant"))
        whole_rejected = render(turns + _as_messages(rejected, "assistant"))
    else:
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        whole_chosen = list(tokenizer(prompt + chosen)["input_ids"])
        whole_rejected = list(tokenizer(prompt + rejected)["input_ids"])
    cut = min(_common_prefix(prompt_ids, whole_chosen), _common_prefix(prompt_ids, whole_rejected))
    return prompt_ids[:cut], whole_chosen[cut:], whole_rejected[cut:]


def tokenize_pairs(batch: dict[str, list[Any]], tokenizer: Any, settings: dict[str, Any]) -> Any:
    """Batched map: prompt/chosen/rejected (JSON) → input_ids and labels of [chosen, rejected], length,
    split, targets (the fewer scored tokens of the two), overlong, identical, invalid."""
    import pyarrow as pa

    max_len, drop = settings["max_seq_len"], settings["drop_longer"]
    ids_out, labels_out, length, split, targets, overlong, identical, invalid = [], [], [], [], [], [], [], []
    for i in range(len(batch["prompt"])):
        why = ""
        try:
            prompt, chosen, rejected = (json.loads(batch[r][i]) for r in ("prompt", "chosen", "rejected"))
            head, good, bad = pair_ids(prompt, chosen, rejected, tokenizer, settings.get("chat_template", ""))
        except Exception as exc:  # the chat template refused the conversation
            why = f"the chat template refused it: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
            head, good, bad = [], [], []
        sequences = [head + good, head + bad]
        masks = [[IGNORE_INDEX] * len(head) + good, [IGNORE_INDEX] * len(head) + bad]
        over = not why and max(len(s) for s in sequences) > max_len
        keep = 0 if why or (over and drop) else max_len
        row_ids, row_labels, scored = [], [], []
        for seq, lab in zip(sequences, masks, strict=True):
            seq, lab = seq[:keep], lab[:keep]
            row_ids += seq
            row_labels += lab
            scored.append(sum(1 for label in lab[1:] if label != IGNORE_INDEX))
        ids_out.append(row_ids)
        labels_out.append(row_labels)
        length.append(len(row_ids))
        split.append(min(len(sequences[0]), keep))
        targets.append(min(scored))
        overlong.append(over)
        identical.append(not why and good == bad)
        invalid.append(why)
    as_int = pa.list_(pa.int32())
    return pa.table(
        {
            "input_ids": pa.array(ids_out, type=as_int),
            "labels": pa.array(labels_out, type=as_int),
            "length": pa.array(np.asarray(length, dtype=np.int32)),
            "targets": pa.array(np.asarray(targets, dtype=np.int32)),
            "overlong": pa.array(overlong, type=pa.bool_()),
            "invalid": pa.array(invalid, type=pa.string()),
            "split": pa.array(np.asarray(split, dtype=np.int32)),
            "identical": pa.array(identical, type=pa.bool_()),
        }
    )
