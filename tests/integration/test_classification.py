"""Sequence classification, the task the seeds start with: the tiny recipe learns the shipped
sentiment set on 2 CPU ranks, its metrics are scikit-learn's on its own predictions, 1 and 2 ranks
evaluate the same weights identically, and early stopping stops where its patience says and keeps
the best checkpoint for `export --best`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny-cpu-classification.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("cls") / "run"
    launcher_cli("run", RECIPE, "--out", str(run))
    return run


def test_the_tiny_classifier_learns_negation(trained: Path, metrics) -> None:
    # By construction (launcher/runtime/model/tiny.py tiny_sentiment) the adjective alone and the negation
    # alone each predict the label at exactly chance: 0.9 needs both, in order.
    result = json.loads((trained / "eval.json").read_text())
    assert result["accuracy"] >= 0.9, result
    _, evals = metrics(trained)
    assert [e["step"] for e in evals] == [78, 156]  # eval_strategy: epoch, 2 epochs of 78 steps
    assert evals[0]["accuracy"] > 0.6 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert json.loads((trained / "labels.json").read_text()) == ["negative", "positive"]


def test_eval_json_is_sklearn_on_the_predictions(trained: Path) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    result = json.loads((trained / "eval.json").read_text())
    rows = [json.loads(line) for line in (trained / "eval_predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) > 100  # every validation row, once, in order
    truth, guess = [r["label"] for r in rows], [r["prediction"] for r in rows]
    precision, recall, f1, _ = precision_recall_fscore_support(truth, guess, average="macro", zero_division=0)
    assert result["accuracy"] == accuracy_score(truth, guess)
    assert (result["precision"], result["recall"], result["f1"]) == (precision, recall, f1)
    assert result["confusion_matrix"] == confusion_matrix(truth, guess, labels=["negative", "positive"]).tolist()


def test_one_rank_evaluates_the_same_weights_identically(trained: Path, tmp_path: Path, launcher) -> None:
    final = trained / "checkpoints" / "latest"
    one = tmp_path / "one"
    launcher("run", RECIPE, "cluster.gpus_per_node=1", f"checkpoint.resume={final.resolve()}", "--out", str(one))
    two_ranks, one_rank = (json.loads((run / "eval.json").read_text()) for run in (trained, one))
    for key in ("accuracy", "precision", "recall", "f1", "confusion_matrix", "step"):
        assert one_rank[key] == two_ranks[key], key
    assert one_rank["val_loss"] == pytest.approx(two_ranks["val_loss"], rel=1e-5)
    assert (one / "eval_predictions.jsonl").read_text() == (trained / "eval_predictions.jsonl").read_text()


def test_early_stopping_stops_at_patience_and_exports_the_best(tmp_path: Path, launcher, metrics, export) -> None:
    run = tmp_path / "stop"
    # val_loss must fall by more than 100 to count: the first evaluation stays the best, and two
    # more without improvement (patience 2) end the run at step 15 of 40.
    stopping = ["train.early_stopping.metric=val_loss", "train.early_stopping.patience=2", "train.early_stopping.threshold=100"]
    overrides = [
        "train.epochs=null",
        "train.max_steps=40",
        "train.log_every=5",
        "train.eval_strategy=steps",
        "train.eval_every=5",
        "checkpoint.save_strategy=steps",
        "checkpoint.keep_last=1",
    ]
    done = launcher("run", RECIPE, *overrides, *stopping, "--out", str(run))
    assert "early stopping at step 15" in done.stdout and "best" in done.stdout
    train, evals = metrics(run)
    assert [e["step"] for e in evals] == [5, 10, 15] and train[-1]["step"] == 15
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == ["step-00000005", "step-00000015"]  # keep_last=1, and the best is never deleted

    export(str(run), "--best", "--out", str(tmp_path / "best"))
    export(str(run), "--step", "5", "--out", str(tmp_path / "step5"))
    export(str(run), "--out", str(tmp_path / "last"))
    from transformers import AutoModelForSequenceClassification

    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        best, step5, last = (
            AutoModelForSequenceClassification.from_pretrained(tmp_path / n).eval()(ids).logits for n in ("best", "step5", "last")
        )
    assert torch.equal(best, step5) and not torch.allclose(best, last)


SHORT = [
    "train.epochs=null",
    "train.max_steps=6",
    "train.log_every=1",
    "train.eval_strategy=steps",
    "checkpoint.save_strategy=steps",
    "optim.warmup_ratio=0",
]


@pytest.fixture(scope="module")
def short_fsdp(tmp_path_factory) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("cls-short") / "run"
    launcher_cli("run", RECIPE, *SHORT, "--out", str(run))
    return run


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.backend=ddp"],  # (one process: test_one_rank_evaluates_the_same_weights_identically)
        ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
        ["method.name=freeze", "method.freeze.trainable_last_layers=0"],
    ],
    ids=["ddp", "zero3", "freeze-head-only"],
)
def test_every_backend_and_method_classifies(overrides: list[str], short_fsdp: Path, tmp_path: Path, launcher, metrics) -> None:
    run = tmp_path / "run"
    launcher("run", RECIPE, *SHORT, *overrides, "--out", str(run))
    train, evals = metrics(run)
    reference, _ = metrics(short_fsdp)
    assert [r["step"] for r in train] == list(range(1, 7)) and evals and "accuracy" in evals[-1]
    if overrides[0] == "parallel.backend=ddp":  # same numerics as FSDP2 (fp32)
        for mine, theirs in zip(train, reference):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4), mine["step"]
    elif overrides[0].startswith("method.name=freeze"):
        import warnings

        from safetensors.torch import load_file
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        from launcher.runtime.model.tiny import ensure_tiny_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(run / "checkpoints" / "latest" / "model_optim", tmp_path / "c.pt")
        state = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
        base = load_file(ensure_tiny_model() / "model.safetensors")
        backbone = [k for k in base if k.startswith("model.")]
        assert backbone and all(torch.equal(state[k], base[k]) for k in backbone), "freeze with 0 blocks trains the head only"
        assert set(state) - set(base) == {"score.weight"}  # the new head, and it is what trained
    else:  # ZeRO-3 builds the head through transformers (its own init): it trains, finitely
        assert all(r["loss"] == r["loss"] for r in train) and train[-1]["loss"] < train[0]["loss"] + 0.5


def test_classifier_lora_under_zero3_is_refused_with_the_fix(tmp_path: Path, launcher) -> None:
    """A classifier's LoRA cannot build inside zero.Init (its head trains in full): ZeRO-3 would hold
    the whole base on every rank first. Refused at validation: one line, exit 2, nothing written."""
    run = tmp_path / "run"
    done = launcher(
        "run", RECIPE, *SHORT, "method.name=lora", "parallel.backend=deepspeed", "parallel.zero_stage=3", "--out", str(run), check=False
    )
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: parallel.zero_stage: a classifier's LoRA under ZeRO-3 "), done.stderr
    assert "parallel.backend: fsdp" in lines[0] and "parallel.zero_stage: 2" in lines[0]
    assert not run.exists()
