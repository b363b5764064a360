"""Recipes load, inherit, take overrides and resolve; every shipped recipe validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from launcher.config.load import parse_overrides
from launcher.config.resolve import resolve_batch
from launcher.config.schema import TrainSection

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "tiny-cpu",
        "tiny-cpu-deepspeed",
        "tiny-cpu-qlora",
        "llama3-8b-full-fsdp",
        "llama3-8b-qlora",
        "llama3-70b-qlora-fsdp",
        "llama3-70b-full-zero3-offload",
    } <= names


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    cfg = load_config(recipe)
    t = cfg.train
    assert t.micro_batch_size * t.gradient_accumulation_steps * cfg.cluster.nodes * cfg.cluster.gpus_per_node == t.global_batch_size
    assert cfg.model.hidden_size and cfg.model.num_layers and cfg.model.vocab_size


def test_base_inheritance_and_overrides() -> None:
    cfg = load_config(ROOT / "recipes" / "tiny-cpu-deepspeed.yaml", ["train.max_steps=12", "cluster.env={A: b}"])
    assert cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3
    assert cfg.data.path == "tiny-tasks"  # inherited from tiny-cpu.yaml
    assert cfg.train.max_steps == 12 and cfg.cluster.env == {"A": "b"}
    assert cfg.run.name == "tiny-cpu-deepspeed"


def test_recipe_found_by_name() -> None:
    assert load_config("tiny-cpu.yaml").run.name == "tiny-cpu"


def test_inheritance_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert err.value.keys == ["base"] and "cycle" in str(err.value)


def test_override_values_are_yaml() -> None:
    assert parse_overrides(["a.b=4", "a.c=true", "d=[x, y]", "e=1e-4"]) == {"a": {"b": 4, "c": True}, "d": ["x", "y"], "e": "1e-4"}
    cfg = load_config("tiny-cpu.yaml", ["optim.lr=1e-4"])
    assert cfg.optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("micro", "accum", "total", "dp", "expected"),
    [
        (2, 4, None, 8, (2, 4, 64)),
        (2, None, 64, 8, (2, 4, 64)),
        (None, 4, 64, 8, (2, 4, 64)),
        (None, None, 64, 8, (1, 8, 64)),
        (None, None, None, 8, (1, 1, 8)),
        (3, None, None, 2, (3, 1, 6)),
        (2, 4, 64, 8, (2, 4, 64)),
    ],
)
def test_batch_arithmetic(micro, accum, total, dp, expected) -> None:
    t = resolve_batch(TrainSection(micro_batch_size=micro, gradient_accumulation_steps=accum, global_batch_size=total), dp)
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.global_batch_size) == expected


def test_architecture_read_from_local_model_dir(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    hf = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": 500,
    }
    (model / "config.json").write_text(json.dumps(hf))
    cfg = load_config("tiny-cpu.yaml", [f"model.name_or_path={model}"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_key_value_heads, cfg.model.vocab_size) == (64, 2, 4, 500)
    assert cfg.model.name_or_path == str(model)


def test_written_config_yaml_loads_again(tmp_path: Path) -> None:
    from launcher.cli import main

    for recipe in ("tiny-cpu.yaml", "tiny-cpu-deepspeed.yaml", "llama3-70b-qlora-fsdp.yaml"):
        out = tmp_path / recipe
        assert main(["plan", recipe, "--out", str(out)]) == 0
        assert load_config(out / "config.yaml") == load_config(recipe)
