"""Numerics shared by every backend: the loss denominator follows the loss's own shift rule (a
document's first token is never predicted), so a `template: text` run's train loss equals its
validation loss on the same rows (the stored loss curve is in tests/dist/test_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]


def test_text_template_train_loss_equals_val_loss_on_the_same_rows(tmp_path: Path, launcher, metrics) -> None:
    rows = [
        {"text": f"the {w} sat on the {v} and then it ran to the {u}"}
        for w, v, u in zip(
            "cat dog fox owl bee ant elk yak".split(),
            "mat rug box hat bed cup car bus".split(),
            "sea hill lake road tree door gate wall".split(),
        )
    ]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    overrides = [
        f"data.path={data}",
        f"data.val_path={data}",  # the same 8 documents
        "data.template=text",
        "data.packing=false",
        "train.eval_exact_match=0",
        "train.max_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.eval_batches=1",
        "optim.warmup_steps=0",
        "optim.lr=1e-12",  # one step that leaves the weights as they were, to fp32 precision
        "parallel.backend=single",
        "cluster.gpus_per_node=1",
        "checkpoint.resume=never",
    ]
    launcher("run", str(ROOT / "recipes" / "tiny-cpu.yaml"), *overrides, "--out", str(run))
    train, evals = metrics(run)
    # With every label counted (the old denominator) train loss was val loss x (L - D) / L: 8 docs of ~16 tokens, ~6 % low.
    assert train[0]["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5), (train[0]["loss"], evals[-1]["val_loss"])
