"""parallel.backend: auto (the default) becomes ddp or fsdp at plan time, by the memory estimate and
never against validation; the plan, its summary and plan.json say which and why. No processes start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import ConfigError, RunConfig, load_config
from launcher.plan import Plan, build_plan
from launcher.plan.backend import resolve_backend

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
AUTO = "parallel.backend=auto"
# Llama 3.1 70B's shape (the shipped 70B recipe), full fine-tuning on one node of 8 x 80 GiB
LLAMA_70B_FULL = [AUTO, "method.name=full", "cluster.nodes=1", "cluster.gpus_per_node=8", "cluster.gpu_memory_gib=80"]


def _choose(recipe: str, *overrides: str) -> tuple[RunConfig, str, str]:
    cfg, choice = resolve_backend(load_config(recipe, list(overrides)))
    assert choice.chosen == cfg.parallel.backend and choice.requested == "auto"
    return cfg, choice.chosen, choice.reason


def test_auto_is_the_default() -> None:
    assert RunConfig().parallel.backend == "auto"


def test_a_tiny_model_gets_ddp_on_cpu_and_on_a_gpu() -> None:
    _, backend, reason = _choose(TINY, AUTO)
    assert backend == "ddp"
    assert reason.startswith("auto: the whole training state, ") and "small (<= 2 GiB per CPU process)" in reason
    _, backend, reason = _choose(TINY, AUTO, "cluster.accelerator=cuda", "cluster.gpu_memory_gib=80")
    assert backend == "ddp" and reason.endswith("fits on each 80 GiB GPU with margin")


def test_a_70b_model_on_8_x_80_gib_gets_fsdp() -> None:
    cfg, backend, reason = _choose(str(ROOT / "recipes" / "llama3-70b-qlora-fsdp.yaml"), *LLAMA_70B_FULL)
    assert cfg.model.num_layers == 80 and cfg.model.hidden_size == 8192
    assert backend == "fsdp"
    assert "is over 80% of each 80 GiB GPU; FSDP2 shards it over 8 ranks" in reason


def test_an_unknown_gpu_is_taken_for_the_smallest_known_one() -> None:
    _, backend, reason = _choose(str(ROOT / "recipes" / "llama3-8b-classifier.yaml"), AUTO)
    assert backend == "ddp" and "assumed" not in reason  # the recipe gives its GPU's memory
    _, backend, reason = _choose(str(ROOT / "recipes" / "llama3-8b-classifier.yaml"), AUTO, "cluster.gpu_memory_gib=null")
    assert backend == "fsdp"  # 18 GiB fits 80 GiB with margin, not 22.5 GiB
    assert "over 80% of each 22.5 GiB GPU (memory not given: assumed 22.5 GiB; set cluster.gpu_memory_gib)" in reason


@pytest.mark.parametrize("recipe", ["tiny-cpu.yaml", "llama3-8b-full-fsdp.yaml", "llama3-8b-qlora.yaml", "tiny-cpu-deepspeed.yaml"])
def test_an_explicit_backend_is_kept(recipe: str) -> None:
    cfg = load_config(ROOT / "recipes" / recipe)
    resolved, choice = resolve_backend(cfg)
    assert resolved == cfg and choice.chosen == choice.requested == cfg.parallel.backend != "auto"
    plan = build_plan(cfg, "/scratch/runs/x")
    assert plan.config["parallel"]["backend"] == cfg.parallel.backend
    assert plan.backend_choice == {"requested": cfg.parallel.backend, "chosen": cfg.parallel.backend, "reason": "set in the recipe"}
    # An explicit ddp stays ddp even where auto would shard (the memory check then speaks for itself).
    big, choice = resolve_backend(load_config(ROOT / "recipes" / "llama3-8b-full-fsdp.yaml", ["parallel.backend=ddp"]))
    assert big.parallel.backend == choice.chosen == "ddp"


def test_validation_refusing_ddp_makes_auto_pick_fsdp() -> None:
    # An FSDP setting: ddp would be refused ("is an FSDP setting"), so auto shards although ddp fits.
    cfg, backend, reason = _choose(TINY, AUTO, "parallel.fsdp.reshard_after_forward=false")
    assert backend == "fsdp" and "ddp is refused here (parallel.fsdp.reshard_after_forward: is an FSDP setting" in reason
    assert cfg.parallel.fsdp.reshard_after_forward is False
    # One process gets single, unless an FSDP setting asks for FSDP2.
    _, backend, reason = _choose(TINY, AUTO, "cluster.gpus_per_node=1")
    assert (backend, reason) == ("single", "auto: one process, nothing to replicate or shard")
    _, backend, _ = _choose(TINY, AUTO, "cluster.gpus_per_node=1", "parallel.fsdp.reshard_after_forward=false")
    assert backend == "fsdp"


def test_auto_never_picks_what_validation_refuses() -> None:
    # QLoRA with a storage dtype FSDP2 cannot flatten: fine on ddp while it fits ...
    qlora = str(ROOT / "recipes" / "llama3-70b-qlora-fsdp.yaml")
    mismatch = [AUTO, "method.quant.quant_storage_dtype=float32"]
    assert _choose(qlora, *mismatch)[1] == "ddp"
    # ... and refused with every reason once ddp does not fit either, instead of a plan that fails on the ranks.
    with pytest.raises(ConfigError) as caught:
        resolve_backend(load_config(qlora, [*mismatch, "cluster.gpu_memory_gib=40"]))
    assert caught.value.keys == ["parallel.backend", "method.quant.quant_storage_dtype"]
    assert "auto found no backend for this recipe: the whole training state" in str(caught.value)
    # fp16 needs DeepSpeed's loss scaling: auto, which never picks DeepSpeed, is refused at load.
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [AUTO, "cluster.accelerator=cuda", "train.precision=fp16"])
    assert caught.value.keys == ["train.precision"] and "parallel.backend: deepspeed" in str(caught.value)
    # DeepSpeed settings are not a request for DeepSpeed: the backend must be named.
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [AUTO, "parallel.zero_stage=2"])
    assert caught.value.keys == ["parallel.zero_stage"]


def test_plan_writes_the_choice_and_the_summary_prints_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, AUTO, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("backend "))
    assert line.split(None, 1)[1].startswith("ddp (auto: the whole training state, ") and line.endswith("per CPU process))")
    data = json.loads((out / "plan.json").read_text())
    assert data["backend_choice"]["requested"] == "auto" and data["backend_choice"]["chosen"] == "ddp"
    assert data["backend_choice"]["reason"] in line
    # What the ranks read: a concrete backend, in plan.json and config.yaml alike.
    plan = Plan.load(out / "plan.json")
    assert plan.config["parallel"]["backend"] == plan.run_config.parallel.backend == "ddp"
    assert "backend: ddp" in (out / "config.yaml").read_text() and not (out / "fsdp.json").exists()
    assert load_config(out / "config.yaml").parallel.backend == "ddp"


def test_estimate_prints_the_choice(capsys) -> None:
    assert main(["estimate", str(ROOT / "recipes" / "llama3-8b-full-fsdp.yaml"), AUTO]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("full on fsdp, micro-batch 2 x 4096 tokens")
    assert printed[1].startswith("backend: fsdp (auto: the whole training state, ") and "FSDP2 shards it over 8 ranks" in printed[1]


def test_auto_micro_batch_with_auto_backend() -> None:
    recipe = str(ROOT / "recipes" / "llama3-8b-classifier.yaml")
    auto_batch = [AUTO, "train.auto_micro_batch=true", "train.micro_batch_size=null", "train.gradient_accumulation_steps=null"]
    plan = build_plan(load_config(recipe, auto_batch), "/scratch/runs/x")
    assert plan.config["parallel"]["backend"] == plan.backend_choice["chosen"] in ("ddp", "fsdp")
    assert plan.topology["micro_batch_size"] >= 1 and any(k.startswith("auto_micro_batch_") for k in plan.estimate)
