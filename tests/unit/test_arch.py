"""Architectures as data: shapes and the block class come from the model's own files (no torch on
the plan path), and the Trainer-style schedule (epochs, warmup ratio, per-epoch intervals) counts
steps exactly as the Hugging Face Trainer does."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _archs import SHAPES, tiny_arch

from launcher.config import ConfigError, load_config
from launcher.config.arch import read_architecture
from launcher.config.resolve import resolve_schedule

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_and_block_class_match_transformers(name: str) -> None:
    import transformers

    path = tiny_arch(name)
    arch = read_architecture(path / "config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    numbers = arch.numbers
    assert numbers["hidden_size"] == config.hidden_size and numbers["num_layers"] == config.num_hidden_layers
    assert numbers["num_attention_heads"] == config.num_attention_heads
    assert numbers["vocab_size"] == config.vocab_size and numbers["tie_word_embeddings"] == config.tie_word_embeddings
    expected_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert numbers["num_key_value_heads"] == expected_kv
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    assert numbers["intermediate_size"] == inner
    model_cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    no_split = model_cls._model_mapping[type(config)]._no_split_modules  # type: ignore[attr-defined]
    assert arch.layer_class in no_split and "Embedding" not in arch.layer_class


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "gemma"])
def test_plan_needs_no_hand_written_shapes(name: str, tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"model.name_or_path={tiny_arch(name)}"])
    assert cfg.model.architecture == name and cfg.model.layer_class == read_architecture(tiny_arch(name) / "config.json").layer_class
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"model.name_or_path={tiny_arch(name)}", "model.layer_class=LlamaDecoderLayer"])
    assert err.value.keys == ["model.layer_class"] and "not a class of" in str(err.value)


def test_an_encoder_is_refused_for_causal_lm_and_accepted_for_classification() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"model.name_or_path={tiny_arch('bert')}"])
    assert err.value.keys == ["task"]
    cfg = load_config(str(ROOT / "recipes" / "tiny-cpu-classification.yaml"), [f"model.name_or_path={tiny_arch('bert')}"])
    assert cfg.model.layer_class == "BertLayer"


def test_plan_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from launcher.cli import main; "
        f"main(['plan', {TINY!r}, 'model.name_or_path={tiny_arch('gpt2')}', '--out', {str(tmp_path / 'run')!r}]); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "fsdp.json").read_text())["shard_module_class"] == "GPT2Block"


def test_bad_config_json_values_name_the_file_and_key(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"model.name_or_path={model}"])
    assert err.value.keys == ["model.hidden_size"] and "config.json" in str(err.value)


# (rows, micro, accumulation, data-parallel, epochs, warmup ratio)
SCHEDULES = [(1000, 4, 2, 1, 3, 0.1), (999, 8, 1, 2, 1.5, 0.06), (37, 4, 4, 4, 2, 0.0), (5000, 16, 3, 8, 0.25, 0.2), (10, 32, 1, 1, 3, 0.5)]


@pytest.mark.parametrize(("rows", "micro", "accum", "world", "epochs", "ratio"), SCHEDULES)
def test_epochs_and_warmup_count_like_the_hf_trainer(
    rows: int, micro: int, accum: int, world: int, epochs: float, ratio: float, tmp_path: Path
) -> None:
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=epochs,
        warmup_steps=ratio,
        use_cpu=True,
        report_to=[],
    )
    dataset = TensorDataset(torch.zeros(rows, 1))
    # What each of `world` ranks iterates in the Trainer: a DistributedSampler share, batched.
    loader = DataLoader(dataset, batch_size=micro, sampler=DistributedSampler(dataset, num_replicas=world, rank=0, shuffle=False))
    trainer = Trainer.__new__(Trainer)  # only its step arithmetic is used
    trainer.args = args
    trainer.get_total_train_batch_size = lambda a: micro * accum * world  # type: ignore[method-assign]
    trainer.get_sp_size = lambda: 1  # type: ignore[method-assign]
    trainer.num_examples = lambda d: rows  # type: ignore[method-assign]
    _, per_epoch, _, _, _, _, max_steps = trainer.set_initial_training_values(args, loader)
    warmup = args.get_warmup_steps(max_steps)

    cfg = load_config(
        TINY,
        [
            "train.max_steps=null",
            f"train.epochs={epochs}",
            f"train.micro_batch_size={micro}",
            f"train.gradient_accumulation_steps={accum}",
            "train.global_batch_size=null",
            f"cluster.gpus_per_node={world}",
            "optim.warmup_steps=0",
            f"optim.warmup_ratio={ratio}",
            "train.eval_strategy=epoch",
            "checkpoint.save_strategy=epoch",
        ],
    )
    scheduled = resolve_schedule(cfg, rows)
    assert scheduled.train.max_steps == max_steps
    assert scheduled.optim.warmup_steps == warmup
    assert scheduled.train.eval_every == per_epoch and scheduled.checkpoint.every == per_epoch
    assert dataclasses.replace(scheduled) == resolve_schedule(scheduled, rows)  # idempotent: plan.json can hold it


def test_epochs_and_max_steps_are_exclusive() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.epochs=2", "train.max_steps=10"])
    assert "train.epochs" in err.value.keys


def test_remote_code_is_refused_by_name_at_plan_time_unless_trusted(tmp_path: Path) -> None:
    """A config.json whose model_type transformers does not ship and whose auto_map names the model's
    own code: one line naming model.trust_remote_code at `launcher plan`, not a traceback from
    transformers on every rank after start-up (issue 27). A shipped model_type with an auto_map
    (common in Hub repos) is built from transformers' own code and is not refused."""
    numbers = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 300}
    auto_map = {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "mine-lm", "auto_map": auto_map, **numbers}))
    (remote / "modeling_mine.py").write_text(
        "class MineDecoderLayer: ...\nclass MineForCausalLM:\n    _no_split_modules = ['MineDecoderLayer']\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config("tiny-cpu.yaml", [f"model.name_or_path={remote}"])
    assert str(caught.value).startswith(f"error: model.trust_remote_code: {remote / 'config.json'} names its own modeling code")
    trusted = load_config("tiny-cpu.yaml", [f"model.name_or_path={remote}", "model.trust_remote_code=true", "data.packing=false"])
    assert trusted.model.layer_class == "MineDecoderLayer"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map, **numbers}))
    assert load_config("tiny-cpu.yaml", [f"model.name_or_path={shipped}"]).model.architecture == "llama"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_model_files_of_every_architecture_pass_the_header_checks(name: str) -> None:
    """The plan-time header checks (config/modelfiles.py) know no false positive on a model transformers
    itself saved: biases, tied embeddings, Conv1D, an explicit head_dim, an encoder."""
    from launcher.config.modelfiles import config_problems, file_problems

    arch = read_architecture(tiny_arch(name) / "config.json")
    assert config_problems(arch) == [] and file_problems(tiny_arch(name), arch) == []
