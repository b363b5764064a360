"""data.num_proc changes how preparation is split over processes, never what it prepares."""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.config import load_config
from launcher.runtime.data.packing import prepare_data
from launcher.runtime.model.tiny import _WORDS, ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _chat_rows(count: int) -> list[dict[str, object]]:
    """Conversations of one or two exchanges, some with a system turn, some duplicated, some long."""
    rng = random.Random(3)
    rows: list[dict[str, object]] = []
    for i in range(count):
        if i % 9 == 8:
            rows.append(rows[rng.randrange(len(rows))])  # a duplicate of an earlier row
            continue
        words = 60 if i % 13 == 0 else 4  # every 13th conversation is over max_seq_len
        messages = [{"role": "system", "content": "be brief"}] if i % 2 else []
        for _ in range(1 + i % 2):
            messages += [
                {"role": "user", "content": " ".join(rng.choices(_WORDS, k=words))},
                {"role": "assistant", "content": " ".join(rng.choices(_WORDS, k=3))},
            ]
        rows.append({"messages": messages})
    return rows


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_num_proc_1_and_2_prepare_byte_identical_caches(tmp_path: Path) -> None:
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in _chat_rows(400)))
    tiny = ensure_tiny_model()
    folders = []
    for num_proc in (1, 2):
        overrides = [
            f"data.path={source}",
            "data.template=chat",
            f"data.num_proc={num_proc}",
            "data.max_seq_len=96",
            "data.val_fraction=0.1",
            "train.eval_exact_match=0",
        ]
        data = load_config(ROOT / "recipes" / "tiny-cpu.yaml", overrides).data
        folders.append(prepare_data(data, str(source), tiny, tmp_path / f"cache{num_proc}", seed=1))
    one, two = folders
    assert one.name == two.name  # num_proc is not part of the data fingerprint
    meta = json.loads((one / "meta.json").read_text())
    report = meta["sources"][0]
    # the data exercises every stage: duplicates and over-long rows dropped, rows packed, rows held out
    assert report["duplicates"] > 0 and report["too_long"] > 0 and report["val"] > 0
    assert meta["train"]["documents"] > meta["train"]["rows"] > 0
    first, second = _files(one), _files(two)
    assert first.keys() == second.keys() and "train/input_ids.npy" in first and "eval_prompts.jsonl" in first
    assert [name for name in first if first[name] != second[name]] == []
