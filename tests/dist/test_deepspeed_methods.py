"""LoRA under DeepSpeed ZeRO-3 and QLoRA under ZeRO-2 (2 CPU ranks): they learn, the adapter is
saved non-empty (a known failure elsewhere), loads with peft and reproduces the checkpoint's
logits. QLoRA under ZeRO-3 is refused at validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.runtime.state import checkpoint as ckpt

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytestmark = pytest.mark.dist

QUICK = [
    "parallel.backend=deepspeed",
    "parallel.zero_stage=3",
    "train.max_steps=12",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
    "optim.scheduler=constant",
    "optim.lr=5e-3",
    "checkpoint.every=0",
    "checkpoint.resume=never",
]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _reference_logits(run: Path, base: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained model straight from the DeepSpeed checkpoint: DeepSpeed's own
    zero_to_fp32 consolidation, loaded by name into a peft model built from the recipe."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, get_peft_model

    from launcher.runtime.parallel.zero import TAG

    lora = json.loads((run / "config.yaml").with_name("plan.json").read_text())["config"]["method"]["lora"]
    model = get_peft_model(base, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules="all-linear"))
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.find_resume(run / "checkpoints", "auto")), tag=TAG)
    trained = {k: v for k, v in state.items() if ".lora_" in k}
    assert trained and all(k in model.state_dict() for k in trained)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k), "adapter saved empty"
    model.load_state_dict(trained, strict=False)
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _adapter_logits(adapter: Path, base: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(ids).logits.float()


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def test_lora_zero3_adapter_is_saved_and_loads(tmp_path: Path, launcher, export) -> None:
    from transformers import AutoModelForCausalLM

    from launcher.runtime.model.tiny import ensure_tiny_model

    run = tmp_path / "run"
    done = launcher("run", "tiny-cpu.yaml", *QUICK, "method.name=lora", "method.lora.dropout=0", "--out", str(run))
    # The frozen base was partitioned as it loaded (zero.Init): rank 0 never held the whole model.
    assert "launcher: ZeRO-3: built inside zero.Init; this rank holds 50% of the " in done.stdout, done.stdout[-3000:]
    values = _losses(run)
    assert sum(values[-3:]) / 3 < values[0] - 0.3
    export(str(run), "--out", str(tmp_path / "adapter"))
    export(str(run), "--merge", "--out", str(tmp_path / "merged"))

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)

    reference = _reference_logits(run, base(), IDS)
    assert torch.allclose(_adapter_logits(tmp_path / "adapter", base(), IDS), reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(IDS).logits
    assert torch.allclose(merged, reference, atol=1e-4, rtol=0)


def test_qlora_zero3_is_refused_with_the_fix(tmp_path: Path, launcher) -> None:
    """bitsandbytes' 4-bit layers are not built inside zero.Init: ZeRO-3 would hold the whole 4-bit
    base on every rank first. Refused at validation (one line, exit 2, nothing written)."""
    run = tmp_path / "run"
    done = launcher("run", "tiny-cpu-qlora.yaml", *QUICK, "--out", str(run), check=False)
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: parallel.zero_stage: QLoRA under ZeRO-3 "), done.stderr
    assert "parallel.backend: fsdp" in lines[0] and "parallel.zero_stage: 2" in lines[0]
    assert not run.exists()


def test_qlora_zero2_learns_and_exports(tmp_path: Path, launcher, export) -> None:
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    launcher("run", "tiny-cpu-qlora.yaml", *QUICK, "parallel.zero_stage=2", "--out", str(run))
    values = _losses(run)
    assert sum(values[-3:]) / 3 < values[0] - 0.3
    export(str(run), "--out", str(tmp_path / "adapter"))
    export(str(run), "--merge", "--out", str(tmp_path / "merged"))

    from _support import four_bit_tiny_base as base  # the 4-bit base the run trained on

    reference = _reference_logits(run, base(), IDS)
    assert torch.allclose(_adapter_logits(tmp_path / "adapter", base(), IDS), reference, atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")  # bf16 base + adapter, plain
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
