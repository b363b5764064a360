"""Every generated DeepSpeed JSON passes DeepSpeed's own config parser at its planned world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
deepspeed_config = pytest.importorskip("deepspeed.runtime.config")


class _DataParallel:
    """The mpu interface DeepSpeedConfig asks for the data-parallel world size."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def _plans():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        yield recipe.stem, build_plan(load_config(recipe), f"/scratch/{recipe.stem}")
    # Every stage and offload combination, not only the shipped ones.
    for stage, opt, param in [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (2, "cpu", "none"), (3, "cpu", "cpu")]:
        cfg = load_config(
            ROOT / "recipes" / "llama3-70b-full-zero3-offload.yaml",
            # the memory check off: these plans are about the JSON (ZeRO-0/1/2 at 70B would not fit, and are refused)
            [
                f"parallel.zero_stage={stage}",
                f"parallel.offload_optimizer={opt}",
                f"parallel.offload_params={param}",
                "cluster.gpu_memory_gib=null",
            ],
        )
        yield f"zero{stage}-{opt}-{param}", build_plan(cfg, "/scratch/x")
    cfg = load_config(ROOT / "recipes" / "llama3-70b-full-zero3-offload.yaml", ["parallel.offload_params=nvme", "parallel.nvme_path=/nvme"])
    yield "zero3-nvme", build_plan(cfg, "/scratch/x")
    cfg = load_config(
        ROOT / "recipes" / "llama3-8b-full-fsdp.yaml", ["parallel.backend=deepspeed", "parallel.zero_stage=2", "train.precision=fp16"]
    )
    yield "zero2-fp16", build_plan(cfg, "/scratch/x")


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parser asks deepspeed.comm for the rank; outside a job it would assume world size 1.
    monkeypatch.setattr(deepspeed_config.dist, "get_rank", lambda *args, **kwargs: 0)


def test_deepspeed_parser_accepts_every_generated_config() -> None:
    checked = 0
    for name, plan in _plans():
        if plan.deepspeed is None:
            continue
        world = plan.topology["world_size"]
        parsed = deepspeed_config.DeepSpeedConfig(json.loads(json.dumps(plan.deepspeed)), mpu=_DataParallel(world))
        assert parsed.train_batch_size == plan.topology["global_batch_size"], name
        assert parsed.gradient_accumulation_steps == plan.topology["gradient_accumulation_steps"], name
        assert parsed.zero_optimization_stage == plan.deepspeed["zero_optimization"]["stage"], name
        assert "auto" not in json.dumps(plan.deepspeed), name
        with pytest.raises(AssertionError):  # the batch arithmetic really is checked against the world size
            deepspeed_config.DeepSpeedConfig(json.loads(json.dumps(plan.deepspeed)), mpu=_DataParallel(world + 1))
        checked += 1
    assert checked >= 8


def test_zero3_saves_gathered_16bit_weights_and_buckets_follow_hidden_size() -> None:
    plan = build_plan(load_config(ROOT / "recipes" / "tiny-cpu-deepspeed.yaml"), "/scratch/x")
    zero = plan.deepspeed["zero_optimization"]
    hidden = plan.config["model"]["hidden_size"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert plan.deepspeed["optimizer"]["params"]["torch_adam"] is True
