"""Any Hugging Face model: tiny random models of five families, built offline, planned with no
hand-written shapes, trained for a few steps on 2 FSDP2 ranks with full / freeze / LoRA (QLoRA on
Qwen2's biased projections), exported, reloaded with from_pretrained or peft, and the reloaded
logits equal the checkpoint's (loaded into the training model) within 1e-5."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _archs import tiny_arch

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "checkpoint.every=0",
    "checkpoint.resume=never",
    "data.max_seq_len=128",
]
# (architecture, method): each family once or more, each method on the structure it has to get right
# (tied weights and Conv1D in GPT-2, biases in Qwen2, scaled tied embeddings in Gemma, an encoder in
# BERT); QLoRA where bitsandbytes has it. A few 2-rank runs, not the full product: CI time. Llama
# full is every other integration test's run (its export and reload: test_checkpoint.py); BERT full
# trains the same encoder and head as BERT LoRA's modules_to_save, with nothing of its own to get wrong.
CASES = [
    ("gpt2", "freeze"),
    ("gpt2", "lora"),
    ("qwen2", "lora"),
    ("qwen2", "qlora"),
    ("gemma", "freeze"),
    ("gpt_neox", "full"),
    ("mixtral", "lora"),
    ("bert", "lora"),
]


def _recipe(name: str) -> tuple[str, list[str]]:
    if name == "bert":
        return str(ROOT / "recipes" / "tiny-cpu-classification.yaml"), [
            "train.epochs=null",
            "train.eval_strategy=steps",
            "checkpoint.save_strategy=steps",
            "optim.warmup_ratio=0",
        ]
    return str(ROOT / "recipes" / "tiny-cpu.yaml"), []


def _method(method: str) -> list[str]:
    return {
        "full": [],
        "freeze": ["method.name=freeze", "method.freeze.trainable_last_layers=1"],
        "lora": ["method.name=lora", "method.lora.dropout=0", "method.lora.r=4", "method.lora.alpha=8"],
        "qlora": [
            "method.name=qlora",
            "method.lora.dropout=0",
            "method.lora.r=4",
            "method.lora.alpha=8",
            "model.dtype=bfloat16",
            "train.precision=bf16",
        ],
    }[method]


def _training_state(run: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / "consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(run / "checkpoints" / "latest" / "model_optim", target)
    return torch.load(target, weights_only=True)["model"]


def _reference_logits(name: str, method: str, run: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The checkpoint loaded into the training model, built the way the runtime builds it."""
    from launcher.config.schema import LoraSection, MethodSection, ModelSection
    from launcher.runtime.model.build import WeightMap, build_on_meta, load_weights, materialize
    from launcher.runtime.model.methods import apply_method

    task = "classification" if name == "bert" else "causal_lm"
    labels = json.loads((run / "labels.json").read_text()) if task == "classification" else None
    path = tiny_arch(name)
    if method == "qlora":
        from _support import four_bit_base
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(four_bit_base(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        state = {k: v for k, v in _training_state(run, tmp_path).items() if ".lora_" in k}
        model.load_state_dict(state, strict=False)
        return model.eval()(ids).logits.float()
    model = build_on_meta(path, ModelSection(name_or_path=str(path)), "sdpa", torch.float32, task, labels)
    weights = WeightMap.of(model, task)
    lora = LoraSection(r=4, alpha=8, dropout=0.0)
    model = apply_method(model, MethodSection(name=method if method == "lora" else "full", lora=lora), "", task)  # type: ignore[arg-type]
    materialize(model, torch.device("cpu"))
    load_weights(model, weights, path)  # the base, as the runtime loads it (an adapter checkpoint holds no frozen weight)
    trained = _training_state(run, tmp_path)
    if method == "lora":
        assert all(".lora_" in k or ".score." in k or ".classifier." in k for k in trained), "adapter checkpoints hold trainable state only"
    _, unexpected = model.load_state_dict(trained, strict=method != "lora")
    assert not unexpected
    return model.eval()(ids).logits


def _exported_logits(name: str, method: str, run: Path, ids: torch.Tensor, launcher) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if name == "bert" else AutoModelForCausalLM
    out = run / "export"
    launcher("export", str(run), "--out", str(out))
    if method in ("lora", "qlora"):
        if method == "qlora":
            from _support import four_bit_base

            base = four_bit_base(tiny_arch(name))
        else:
            labels = json.loads((run / "labels.json").read_text()) if name == "bert" else None
            extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels))} if labels else {}
            base = auto.from_pretrained(tiny_arch(name), dtype=torch.float32, **extra)
        adapted = PeftModel.from_pretrained(base, out).eval()
        merged = run / "merged"
        launcher("export", str(run), "--merge", "--out", str(merged))
        if method == "lora":  # the merged model is an ordinary model directory too
            reloaded = auto.from_pretrained(merged, dtype=torch.float32).eval()
            torch.testing.assert_close(reloaded(ids).logits, adapted(ids).logits, atol=1e-4, rtol=0)
        return adapted(ids).logits.float()
    config = json.loads((out / "config.json").read_text())
    if name == "gpt_neox":  # the names the original checkpoint has (save_pretrained's), not the module's
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
            assert "embed_out.weight" in set(handle.keys()) and "lm_head.weight" not in set(handle.keys())
    if name == "bert":
        assert config["id2label"] == {"0": "negative", "1": "positive"} and config["architectures"] == ["BertForSequenceClassification"]
    return auto.from_pretrained(out, dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize(("name", "method"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_architecture_trains_exports_and_reloads(name: str, method: str, tmp_path: Path, launcher, metrics) -> None:
    recipe, extra = _recipe(name)
    run = tmp_path / "run"
    launcher("run", recipe, *QUICK, *extra, *_method(method), f"model.name_or_path={tiny_arch(name)}", "--out", str(run))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["config"]["model"]["architecture"] == name and plan["config"]["model"]["hidden_size"] == 64  # from config.json
    train, _ = metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in train)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = _exported_logits(name, method, run, ids, launcher)
        reference = _reference_logits(name, method, run, ids, tmp_path)
    torch.testing.assert_close(exported, reference, atol=1e-5, rtol=0)
