"""The estimate and the plan summary of a preference run: a row is a pair scored through the LM head's
full logits, and the reference pass of dpo/ipo is counted where it runs (every step with adapters,
once before step 1 when stored); simpo and orpo have none."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import load_config
from launcher.plan.estimate import estimate_plan, render_estimate
from launcher.plan.topology import build_topology

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "llama3-8b-dpo-lora.yaml"  # shapes given: no model files needed


def estimate(*overrides: str) -> dict[str, float]:
    cfg = load_config(RECIPE, list(overrides))
    return estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))


def test_a_pair_row_is_two_sequences_through_the_lm_head() -> None:
    """Llama 3.1 8B's untied head counted (8.03 B, as for SFT), and a preference micro-batch holds the
    activations and full fp32 logits of a causal-LM one twice as long."""
    pairs = estimate()
    sft = estimate("task=causal_lm", "data.max_seq_len=4096", "kernels.loss=plain")
    assert pairs["params"] == sft["params"] == 8_030_261_248
    assert pairs["activations"] == sft["activations"] and pairs["logits"] == sft["logits"] == 12.0 * 2 * 4096 * 128256


def test_reference_pass_with_adapters_is_a_forward_every_step() -> None:
    dpo, simpo = estimate(), estimate("preference.loss=simpo", "preference.beta=2.0")
    forward = dpo["reference_flops_per_token"]
    # 2 FLOPs a matmul weight (not the embedding rows nor the 65 norms), causal attention over 2,048 tokens
    assert forward == 2 * (8_030_261_248 - 128_256 * 4096 - 65 * 4096) + 2 * 32 * 2048 * 4096
    assert dpo["flops_per_token"] == pytest.approx(simpo["flops_per_token"] + forward, rel=1e-12)
    assert dpo["step_seconds"] == pytest.approx(simpo["step_seconds"] * dpo["flops_per_token"] / simpo["flops_per_token"], rel=1e-12)
    assert dpo["reference_step_share"] == pytest.approx(forward / dpo["flops_per_token"]) and not dpo["reference_stored"]
    assert dpo["total"] == simpo["total"]  # no grad: nothing saved, its logits peak under the loss's
    assert "the base with the adapters off" in render_estimate(dpo)


def test_stored_reference_is_one_forward_before_step_1() -> None:
    """Full fine-tuning: the reference log-probabilities are computed once (a forward of the first
    epoch, a third of its training compute without recomputation) and add nothing to a step."""
    full = ("method.name=full", "train.activation_checkpointing=false", "cluster.gpu_memory_gib=null")
    dpo, simpo = estimate(*full), estimate(*full, "preference.loss=simpo", "preference.beta=2.0")
    assert dpo["reference_stored"] == 1.0 and dpo["reference_step_share"] == 0.0
    assert dpo["flops_per_token"] == simpo["flops_per_token"] == 3 * dpo["reference_flops_per_token"]
    assert dpo["step_seconds"] == simpo["step_seconds"] and dpo["reference_seconds_per_step"] == pytest.approx(dpo["step_seconds"] / 3)
    assert "once before step 1" in render_estimate(dpo) and "33% of the epoch's training compute" in render_estimate(dpo)
    assert simpo["reference_flops_per_token"] == 0.0 and "reference pass" not in render_estimate(simpo)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ((), "reference    dpo: the base with the adapters off, a forward of every micro-batch (25% of each step's compute)"),
        (
            ("method.name=full", "cluster.gpu_memory_gib=null"),
            "reference    dpo: computed once before step 1 (a forward of the first epoch, 25% of",
        ),
        (("preference.loss=orpo",), "reference    none (orpo is reference-free)"),
    ],
)
def test_plan_summary_names_the_reference_pass(
    overrides: tuple[str, ...], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(RECIPE), *overrides, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert line in out, out
    assert "= 64 pairs (262,144 tokens max)" in out  # 64 pairs of two 2,048-token sequences
