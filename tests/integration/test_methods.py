"""Fine-tuning methods on the tiny model: LoRA, QLoRA, freeze and prompt tuning learn, and train
only what they should (full fine-tuning is covered by test_run_tiny.py and tests/dist)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

# Small steps (one micro-batch of 4 rows per rank), no evaluation, a constant learning rate after a
# short warmup so that runs of different lengths agree step for step.
QUICK = [
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
    "optim.scheduler=constant",
    "checkpoint.every=0",
    "checkpoint.resume=never",
]
SINGLE = ["parallel.backend=single", "cluster.gpus_per_node=1", "train.micro_batch_size=8"]
LORA = ["method.name=lora", "method.lora.dropout=0", "optim.lr=5e-3"]  # no dropout: ranks draw different masks


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(steps[0]["step"], steps[0]["step"] + len(steps)))
    return [r["loss"] for r in steps]


def assert_learns(values: list[float], by: float) -> None:
    last = sum(values[-3:]) / 3
    assert last < values[0] - by, (values[0], last, values)


def consolidated(step_dir: Path, tmp_path: Path) -> dict[str, dict]:
    """A DCP checkpoint as {"model": {name: tensor}, "optim": {...}}, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{step_dir.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": expected here
        dcp_to_torch_save(step_dir / "model_optim", target)
    return torch.load(target, weights_only=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (4-bit codes stored as bf16 include NaN patterns, which torch.equal rejects)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_no_frozen_tensor_in_metadata(step_dir: Path, trainable: set[str]) -> None:
    """DCP's own metadata lists every tensor the checkpoint holds: only trainable ones, and their Adam state."""
    from torch.distributed.checkpoint import FileSystemReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = FileSystemReader(str(step_dir / "model_optim")).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys == trainable, sorted(model_keys ^ trainable)[:5]
    assert all(any(name in k for name in trainable) for k in keys if k.startswith("optim.state."))


def base_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from launcher.runtime.model.tiny import ensure_tiny_model

    return load_file(ensure_tiny_model() / "model.safetensors")


def meta_model(method: str) -> torch.nn.Module:
    """The training model as backends.py makes it before sharding (meta device, method applied)."""
    from launcher.config.schema import MethodSection, ModelSection
    from launcher.runtime.model.build import build_on_meta
    from launcher.runtime.model.methods import apply_method
    from launcher.runtime.model.tiny import ensure_tiny_model

    model = build_on_meta(ensure_tiny_model(), ModelSection(), "sdpa", torch.float32)
    return apply_method(model, MethodSection(name=method))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """LoRA on 2 ranks (FSDP2), 20 steps, checkpoints at steps 10 and 20."""
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("lora") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *QUICK, *LORA, "train.max_steps=20", "checkpoint.every=10", "--out", str(run))
    return run


def test_lora_learns_and_trains_only_adapters(lora_run: Path, tmp_path: Path) -> None:
    assert_learns(losses(lora_run), by=0.5)

    model = meta_model("lora")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    linears = [m for n, m in model.named_modules() if n.endswith("_proj") and hasattr(m, "base_layer")]
    assert len(linears) == 4 * 7  # all-linear: q k v o gate up down in each of the 4 layers, not lm_head
    assert sum(trainable.values()) == sum(16 * (m.in_features + m.out_features) for m in linears)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)

    saved = consolidated(lora_run / "checkpoints" / "step-00000020", tmp_path)
    assert set(saved["optim"]["state"]) == set(trainable)  # the optimizer holds the adapters only
    state = saved["model"]
    assert set(state) == set(trainable), "an adapter checkpoint holds the adapters only, never the frozen base"
    assert_no_frozen_tensor_in_metadata(lora_run / "checkpoints" / "step-00000020", set(trainable))
    lora_b = [t for n, t in state.items() if ".lora_B." in n]
    assert len(lora_b) == 28 and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero and moved


def test_lora_two_ranks_match_one_process(lora_run: Path, tmp_path: Path, launcher) -> None:
    one = tmp_path / "one"
    launcher("run", "tiny-cpu.yaml", *QUICK, *LORA, *SINGLE, "train.max_steps=10", "--out", str(one))
    for step, (a, b) in enumerate(zip(losses(lora_run)[:10], losses(one)), start=1):
        assert a == pytest.approx(b, rel=1e-4), (step, a, b)


def test_lora_resumes_exactly(lora_run: Path, tmp_path: Path, launcher) -> None:
    again = tmp_path / "resumed"
    step10 = lora_run / "checkpoints" / "step-00000010"
    done = launcher("run", "tiny-cpu.yaml", *QUICK, *LORA, "train.max_steps=20", f"checkpoint.resume={step10}", "--out", str(again))
    assert "resuming from" in done.stdout
    assert losses(again) == pytest.approx(losses(lora_run)[10:], rel=1e-6)


def test_lora_export_adapter_and_merged(lora_run: Path, tmp_path: Path, export) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.runtime.model.tiny import ensure_tiny_model

    export(str(lora_run), "--out", str(tmp_path / "adapter"))
    export(str(lora_run), "--merge", "--out", str(tmp_path / "merged"))
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=0)
    assert not torch.allclose(merged, plain, atol=1e-2)  # the adapter is not empty


def test_qlora_one_and_two_processes(tmp_path: Path, launcher, export) -> None:
    """4-bit NF4 base (bitsandbytes' CPU backend) + LoRA: 1 process and 2 FSDP2 ranks learn alike."""
    # 12 steps: the 4-bit runs are CI's slowest; measured, they learn by more than 0.5 well within 12
    # steps and the 1 vs 2 process comparison runs over the steps where it is tightest.
    steps = ["train.max_steps=12", "optim.lr=5e-3"]
    two = tmp_path / "two"
    # Evaluation runs bitsandbytes' no-grad path, which once re-packed the weights and crashed.
    launcher("run", "tiny-cpu-qlora.yaml", *QUICK, *steps, "train.eval_batches=1", "checkpoint.every=6", "--out", str(two))
    one = tmp_path / "one"
    launcher("run", "tiny-cpu-qlora.yaml", *QUICK, *steps, *SINGLE, "--out", str(one))
    assert_learns(losses(two), by=0.5)
    assert_learns(losses(one), by=0.5)
    # bf16 compute (FSDP2's param dtype vs autocast): measured within 6e-4 over the first 12
    # steps; rounding differences then grow to a few 1e-3.
    for step, (a, b) in enumerate(zip(losses(two), losses(one)), start=1):
        assert a == pytest.approx(b, rel=2e-3 if step <= 10 else 1e-2), (step, a, b)
    last = consolidated(two / "checkpoints" / "step-00000012", tmp_path)
    assert set(last["optim"]["state"]) == set(last["model"]) and all(".lora_" in n for n in last["model"])  # no 4-bit base saved

    # The adapter exported from each run loads with peft and gives the checkpoint's logits; the
    # merged export (bf16 base + adapter) loads with from_pretrained.
    from _support import four_bit_tiny_base as four_bit_base  # the 4-bit base the runs trained on
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    for run in (one, two):
        export(str(run), "--out", str(run / "adapter"))
        export(str(run), "--merge", "--out", str(run / "merged"))
        state = consolidated(run / "checkpoints" / "step-00000012", tmp_path)["model"]
        reference = get_peft_model(four_bit_base(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        trained = {k: v for k, v in state.items() if ".lora_" in k}
        assert len(trained) == 56 and set(trained) <= set(reference.state_dict())
        reference.load_state_dict(trained, strict=False)
        adapted = PeftModel.from_pretrained(four_bit_base(), run / "adapter")
        with torch.no_grad():
            assert torch.allclose(adapted.eval()(ids).logits.float(), reference.eval()(ids).logits.float(), atol=1e-5, rtol=0)
        merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype="auto")
        assert merged.dtype == torch.bfloat16


def test_freeze_trains_only_the_top_layers_and_head(tmp_path: Path, launcher) -> None:
    run = tmp_path / "freeze"
    launcher("run", "tiny-cpu.yaml", *QUICK, "method.name=freeze", "train.max_steps=20", "--out", str(run))
    assert_learns(losses(run), by=0.5)
    state = consolidated(run / "checkpoints" / "step-00000020", tmp_path)["model"]
    trainable = ("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head.")
    for key, original in base_weights().items():
        if key.startswith(trainable):
            assert not torch.equal(state[key], original), f"trainable {key} did not change"
        else:
            assert torch.equal(state[key], original), f"frozen {key} changed"


def test_prompt_tuning_learns_only_the_prompt(tmp_path: Path, launcher) -> None:
    model = meta_model("prompt_tuning")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight": 16 * 128}

    run = tmp_path / "prompt"
    # Prompt tuning moves a random base model slowly: a prompt-tuning learning rate and 30 steps.
    overrides = ["method.name=prompt_tuning", "data.packing=false", "optim.lr=0.1", "train.max_steps=30"]
    launcher("run", "tiny-cpu.yaml", *QUICK, *overrides, "--out", str(run))
    assert_learns(losses(run), by=0.3)
    saved = consolidated(run / "checkpoints" / "step-00000030", tmp_path)
    assert set(saved["optim"]["state"]) == set(trainable)
    assert set(saved["model"]) == set(trainable), "only the prompt is saved"
