"""Trying what a run trained (issue 29): `launcher eval` through the training's own evaluation (its
numbers on the run's validation set equal the run's final evaluation), predictions that carry their
text, `launcher generate` on a prompts file and `launcher chat` over stdin for two turns. One tiny
causal run (4 steps, its validation set a file of its own) and one tiny classifier, per module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["train.max_steps=4", "optim.warmup_steps=1", "train.eval_exact_match=3", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Prompts the shipped task set never holds (its numbers have two digits): the run's validation file."""
    path = tmp_path_factory.mktemp("data") / "held-out.jsonl"
    rows = [{"prompt": f"add: {a} + {a + 7}", "response": str(2 * a + 7)} for a in range(100, 130)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def causal(tmp_path_factory, held_out: Path) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("lm") / "run"
    launcher_cli("run", str(ROOT / "recipes" / "tiny-cpu.yaml"), *SHORT, f"data.val_path={held_out}", "--out", str(run))
    return run


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("cls") / "run"
    short = ["train.epochs=null", "train.max_steps=4", "train.eval_strategy=steps", "checkpoint.save_strategy=steps"]
    launcher_cli("run", str(ROOT / "recipes" / "tiny-cpu-classification.yaml"), *short, "--out", str(run))
    return run


def _same(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert found[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        else:
            assert found[key] == value, key


def test_eval_on_the_validation_file_equals_the_final_evaluation(causal: Path, held_out: Path, tmp_path: Path) -> None:
    from _support import launcher_cli

    out = tmp_path / "eval"
    done = launcher_cli("eval", str(causal), "--data", str(held_out), "--out", str(out))
    assert "(validation): read 30" in done.stdout and f"step 4 on {held_out}" in done.stdout
    _same(json.loads((out / "eval.json").read_text()), json.loads((causal / "eval.json").read_text()))
    assert (out / "eval_predictions.jsonl").read_text() == (causal / "eval_predictions.jsonl").read_text()
    first = json.loads((out / "eval_predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "### Instruction:\nadd: 100 + 107\n\n### Response:\n" and first["reference"] == "207"


def test_classifier_eval_equals_its_final_evaluation_and_predictions_carry_text(classifier: Path) -> None:
    from _support import launcher_cli

    done = launcher_cli("eval", str(classifier))
    assert "accuracy" in done.stdout and "confusion_matrix" in done.stdout
    out = classifier / "evals" / "validation-step-4"
    _same(json.loads((out / "eval.json").read_text()), json.loads((classifier / "eval.json").read_text()))
    rows = [json.loads(line) for line in (classifier / "eval_predictions.jsonl").read_text().splitlines()]
    assert all(r["text"].startswith("the ") and r["label"] in ("negative", "positive") for r in rows), rows[:3]
    from launcher.runtime.model.tiny import shipped_data

    shipped = shipped_data("tiny-sentiment")
    assert shipped is not None
    source = {json.loads(line)["text"] for line in shipped.read_text().splitlines()}
    assert {r["text"] for r in rows} <= source  # the text as written, decoded from the tokens the model read
    refused = launcher_cli("generate", str(classifier), "--prompts", str(ROOT / "README.md"), check=False)
    assert refused.returncode == 2 and "classification run" in refused.stderr


def test_generate_answers_as_the_training_evaluation_did(causal: Path, tmp_path: Path) -> None:
    from _support import launcher_cli

    evaluated = [json.loads(line) for line in (causal / "eval_predictions.jsonl").read_text().splitlines()]
    prompts = tmp_path / "prompts.jsonl"
    asked = [r["prompt"].removeprefix("### Instruction:\n").removesuffix("\n\n### Response:\n") for r in evaluated]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in asked) + "plain text line\n")
    out = tmp_path / "answers.jsonl"
    done = launcher_cli("generate", str(causal), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6")
    assert f"4 answers in {out}" in done.stdout
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2, 3] and [a["prompt"] for a in answers[:3]] == asked
    for answer, record in zip(answers, evaluated):  # greedy both: the same answer (the evaluation stops at the reference's length)
        assert record["prediction"].startswith(answer["output"][: len(record["prediction"])])


def test_chat_reads_two_turns_from_a_pipe(causal: Path) -> None:
    import os

    done = subprocess.run(
        [sys.executable, "-m", "launcher", "chat", str(causal), "--max-new-tokens", "4"],
        input="add: 1 + 2\n\ncopy: a b\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2  # one answer a turn (an empty line is no turn); /exit ends
    assert "launcher chat" not in done.stderr  # the banner is for a terminal


def test_chat_template_keeps_the_conversation() -> None:
    from launcher.generate import Loaded, prompt_ids
    from launcher.runtime.data.templates import chat_template
    from launcher.runtime.model.build import load_tokenizer
    from launcher.runtime.model.tiny import ensure_tiny_model

    base = ensure_tiny_model()
    tokenizer = load_tokenizer(base)
    chat = Loaded(None, tokenizer, "chat", chat_template("", tokenizer, base), None)
    turns = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"}]
    text = tokenizer.decode(prompt_ids(chat, [*turns, {"role": "user", "content": "second question"}]))
    assert text.index("first question") < text.index("an answer") < text.index("second question")
    single = Loaded(None, tokenizer, "instruction", "", None)
    text = tokenizer.decode(prompt_ids(single, [*turns, {"role": "user", "content": "second question"}]), skip_special_tokens=True)
    assert text == "### Instruction:\nsecond question\n\n### Response:\n"
