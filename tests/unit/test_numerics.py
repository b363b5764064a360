"""Numerics shared by every backend: the loss denominator follows the loss's own shift rule (a
document's first token is never predicted), so train loss (divided by the prepared counts) and val
loss (divided by the targets the loss itself saw) mean the same thing (the stored loss curve is in
tests/dist/test_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from launcher.kernels.attention import next_token_targets

from launcher.config.schema import DataSection
from launcher.runtime.data.packing import IGNORE_INDEX, TokenData, prepare_data
from launcher.runtime.model.tiny import ensure_tiny_model, ensure_tiny_tasks


def _texts(tmp_path: Path) -> Path:
    words = "cat dog fox owl bee ant elk yak emu cow pig hen bat rat eel cod".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 7))} for i in range(40)]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepared_label_counts_are_the_losss_targets_for_every_template(tmp_path: Path) -> None:
    """With `template: text` every token is a label: counting them all (the old rule) overstated the
    denominator by one per document, scaling the gradient by (L - D) / L against val loss."""
    for template, source in (("text", str(_texts(tmp_path))), ("instruction", str(ensure_tiny_tasks()))):
        data = DataSection(path=source, template=template, max_seq_len=64, packing=True, val_fraction=0.0)
        folder = prepare_data(data, source, ensure_tiny_model(), tmp_path / "cache", seed=0)
        split = TokenData(folder, "train")
        rows = list(range(min(len(split), 24)))
        batch = split.batch(rows)
        targets = next_token_targets(torch.from_numpy(batch.labels), torch.from_numpy(batch.position_ids))
        assert int((targets != IGNORE_INDEX).sum()) == batch.label_tokens, template
        every_label = int((batch.labels != IGNORE_INDEX).sum())
        documents = int((batch.position_ids == 0).sum()) - int(np.count_nonzero(batch.lengths < batch.input_ids.shape[1]))
        if template == "text":
            assert every_label - batch.label_tokens == documents > len(rows)  # several documents per packed row
