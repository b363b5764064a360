"""Any Hugging Face model: tiny random models of eight families (two of them Mixture-of-Experts),
built offline and saved by save_pretrained in their on-disk layout, planned with no hand-written
shapes, trained for two steps on 2 FSDP2 ranks (one MoE under ZeRO-3) with full / freeze / LoRA
(QLoRA on Qwen2's biased projections), exported, reloaded with from_pretrained or peft, and the
reloaded logits equal the checkpoint's (loaded into the training model) within 1e-5."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from _archs import tiny_arch

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Two steps (the second's loss already follows an update) on 64-token rows: each case is a 2-rank run,
# its time mostly the ranks' start-up, and the matrix has a dozen of them (CI time).
QUICK = [
    "train.max_steps=2",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "checkpoint.every=0",
    "checkpoint.resume=never",
    "data.max_seq_len=64",
]
# (architecture, method, backend): each family once or more, each method on the structure it has to get
# right (tied weights and Conv1D in GPT-2, biases in Qwen2, scaled tied embeddings in Gemma, an encoder
# in BERT, a head transformers renames on load in GPT-NeoX, fused experts in Mixtral and Qwen2-MoE, the
# latter with a shared expert); QLoRA where bitsandbytes has it. A few 2-rank runs, not the full
# product: CI time. Llama full is every other integration test's run (its export and reload:
# test_checkpoint.py); BERT full trains the same encoder and head as BERT LoRA's modules_to_save, with
# nothing of its own to get wrong. The families whose checkpoints transformers converts on load
# (GPT-NeoX, the MoEs) train full and LoRA; Mixtral's LoRA (peft's adapters on the fused experts) under
# DeepSpeed ZeRO-3 too, experts partitioned. (peft's all-linear adapts Qwen2-MoE's attention and
# shared expert, not its fused experts: its merged export is the dense one, reading fused experts.)
CASES = [
    ("gpt2", "freeze", "fsdp"),
    ("gpt2", "lora", "fsdp"),
    ("qwen2", "lora", "fsdp"),
    ("qwen2", "qlora", "fsdp"),
    ("gemma", "freeze", "fsdp"),
    ("gpt_neox", "full", "fsdp"),
    ("gpt_neox", "lora", "fsdp"),
    ("mixtral", "full", "fsdp"),
    ("mixtral", "lora", "fsdp"),
    ("qwen2_moe", "full", "fsdp"),
    ("qwen2_moe", "lora", "fsdp"),
    ("mixtral", "lora", "zero3"),
    ("bert", "lora", "fsdp"),
]
# The one case exported through `python -m launcher export`, as a user does; the others call the same
# main() in the test's process (a Python, torch and transformers start-up saved per export, about 11 s).
CLI_EXPORT = ("gpt_neox", "full", "fsdp")
BACKENDS = {"fsdp": [], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


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


def _training_state(run: Path, backend: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint, consolidated, under the training model's names."""
    folder = run / "checkpoints" / "latest"
    if backend == "zero3":
        from launcher.runtime.state.export import DeepSpeedModelReader

        return {name.removeprefix("model."): tensor for name, tensor in DeepSpeedModelReader(folder).items()}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / "consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder / "model_optim", target)
    return torch.load(target, weights_only=True)["model"]


def _reference_logits(name: str, method: str, trained: dict[str, torch.Tensor], run: Path, ids: torch.Tensor) -> torch.Tensor:
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
        model.load_state_dict({k: v for k, v in trained.items() if ".lora_" in k}, strict=False)
        return model.eval()(ids).logits.float()
    model = build_on_meta(path, ModelSection(name_or_path=str(path)), "sdpa", torch.float32, task, labels)
    weights = WeightMap.of(model, task)
    lora = LoraSection(r=4, alpha=8, dropout=0.0)
    model = apply_method(model, MethodSection(name=method if method == "lora" else "full", lora=lora), "", task)  # type: ignore[arg-type]
    materialize(model, torch.device("cpu"))
    load_weights(model, weights, path)  # the base, as the runtime loads it (an adapter checkpoint holds no frozen weight)
    if method == "lora":
        assert all(".lora_" in k or ".score." in k or ".classifier." in k for k in trained), "adapter checkpoints hold trainable state only"
    _, unexpected = model.load_state_dict(trained, strict=method != "lora")
    assert not unexpected
    return model.eval()(ids).logits


def _saved_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names |= set(handle.keys())
    return names


def _exported_logits(name: str, method: str, run: Path, ids: torch.Tensor, export: Callable[..., object]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if name == "bert" else AutoModelForCausalLM
    out = run / "export"
    export(str(run), "--out", str(out))
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
        export(str(run), "--merge", "--out", str(merged))
        if method == "lora":  # the merged model is an ordinary model directory too, in the base's layout
            if name != "bert":  # (a classifier's merged head is new)
                assert _saved_names(merged) == _saved_names(tiny_arch(name))
            reloaded = auto.from_pretrained(merged, dtype=torch.float32).eval()
            torch.testing.assert_close(reloaded(ids).logits, adapted(ids).logits, atol=1e-4, rtol=0)
        return adapted(ids).logits.float()
    # The names save_pretrained writes, not the module's: GPT-NeoX's embed_out, the MoEs' per-expert
    # weights (block_sparse_moe.experts.N.w1 in Mixtral), GPT-2 and Gemma without the tied head.
    assert _saved_names(out) == _saved_names(tiny_arch(name))
    return auto.from_pretrained(out, dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize(("name", "method", "backend"), CASES, ids=[f"{n}-{m}" + ("-zero3" if b == "zero3" else "") for n, m, b in CASES])
def test_architecture_trains_exports_and_reloads(name: str, method: str, backend: str, tmp_path: Path, launcher, export, metrics) -> None:
    recipe, extra = _recipe(name)
    run = tmp_path / "run"
    model = f"model.name_or_path={tiny_arch(name)}"
    launcher("run", recipe, *QUICK, *extra, *BACKENDS[backend], *_method(method), model, "--out", str(run))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["config"]["model"]["architecture"] == name and plan["config"]["model"]["hidden_size"] == 64  # from config.json
    assert plan["config"]["parallel"]["backend"] == ("deepspeed" if backend == "zero3" else "fsdp")
    if backend == "zero3":  # built inside zero.Init: no rank holds the whole model, experts included
        assert "this rank holds 50% of the" in (run / "logs" / "launcher.log").read_text()
    train, _ = metrics(run)
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] == r["loss"] for r in train)
    if (name, method, backend) == CLI_EXPORT:
        export = partial(launcher, "export")
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = _exported_logits(name, method, run, ids, export)
        reference = _reference_logits(name, method, _training_state(run, backend, tmp_path), run, ids)
    torch.testing.assert_close(exported, reference, atol=1e-5, rtol=0)
