"""The demo path: `launcher run recipes/tiny-cpu.yaml` (2 processes, FSDP2 over gloo) end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from launcher.runtime.data.packing import IGNORE_INDEX, TokenData

pytestmark = pytest.mark.dist


def unigram_entropy(cache: Path) -> float:
    """Entropy (nats) of the response tokens' unigram distribution: the best loss a model that
    ignores the prompt can reach. Falling well below it means the model reads the prompt."""
    labels = np.asarray(TokenData(cache, "train").labels)
    counts = np.bincount(labels[labels != IGNORE_INDEX])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_recipe_trains_end_to_end(tmp_path: Path, launcher, metrics) -> None:
    run = tmp_path / "tiny"
    done = launcher("run", "recipes/tiny-cpu.yaml", "train.report_to=[tensorboard]", "--out", str(run), timeout=900, plot=True)
    assert "launcher: done" in done.stdout
    train, evals = metrics(run)
    assert train[0]["step"] == 1 and train[-1]["step"] == 200
    for record in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"} <= set(record)
    manifest = json.loads((run / "checkpoints" / "latest" / "manifest.json").read_text())
    # Every save prints and records its own time (what cluster.signal_seconds must cover).
    written = f"launcher: checkpoint {os.readlink(run / 'checkpoints' / 'latest')} written: "
    assert any(written in line and line.endswith(" s") for line in done.stdout.splitlines()), done.stdout[-2000:]
    assert 0 < manifest["save_seconds"] < 60
    baseline = unigram_entropy(Path(os.environ["LAUNCHER_CACHE_DIR"]) / "data" / manifest["data_fingerprint"])
    first, last = train[0]["loss"], np.mean([r["loss"] for r in train[-3:]])
    assert first > 6.0  # about ln(vocab): an untrained model
    assert last < 0.6 * baseline, (last, baseline)
    assert evals and evals[-1]["val_loss"] < 0.7 * baseline and evals[-1]["exact_match"] > 0.0
    # The last evaluation whole in eval.json; its generated answers in eval_predictions.jsonl, from
    # which exact match and ROUGE-L (rouge-score) are recomputed.
    result = json.loads((run / "eval.json").read_text())
    assert result == {k: v for k, v in evals[-1].items() if k != "elapsed"}
    answers = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == list(range(32))
    assert result["exact_match"] == sum(a["prediction"] == a["reference"] for a in answers) / 32
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(a["reference"], a["prediction"])["rougeL"].fmeasure for a in answers) / 32
    assert result["rouge_l"] == pytest.approx(rouge) and result["rouge_l"] >= result["exact_match"]
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (run / "checkpoints" / "latest" / "COMPLETE").exists()
    # train.report_to: TensorBoard got, from rank 0, the records metrics.jsonl got, at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [
        (r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in evals
    ]
