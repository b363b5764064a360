"""One set of optimizer parameter groups for every backend: 1-D parameters (norms, biases) are
never decayed, on the torch optimizer and on DeepSpeed's (through its own initialize, ZeRO-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from launcher.config.schema import OptimSection
from launcher.runtime.parallel.optim import build_optimizer, parameter_groups


def _gpt2() -> torch.nn.Module:  # biases, LayerNorms, Conv1D matrices and tied embeddings
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def test_groups_split_by_rank() -> None:
    model = _gpt2()
    decayed, plain = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert {names[id(p)] for p in plain["params"]} >= {
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "transformer.h.0.attn.c_attn.bias",
    }
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))  # tied weight once
    optimizer = build_optimizer(model, OptimSection(weight_decay=0.1))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.defaults["fused"] and not optimizer.defaults["foreach"]  # plain tensors: the fused kernel


def test_frozen_parameters_left_out() -> None:
    model = _gpt2()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("transformer.h.0.mlp"))
    groups = parameter_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 4  # c_fc / c_proj weights and biases


SCRIPT = textwrap.dedent(
    """
    import json, os, torch, deepspeed
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.integrations import HfDeepSpeedConfig
    from launcher.runtime.parallel.optim import parameter_groups, parameter_ndim
    from launcher.runtime.parallel.zero import _prepare_environment

    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
    }
    # As the ranks start DeepSpeed: gloo, and without the shared-memory all-reduce DeepSpeed would
    # otherwise compile at init_distributed (about 50 s of C++ on 2 CPUs on a fresh cache, CI's).
    _prepare_environment()
    keep = HfDeepSpeedConfig(config)  # build partitioned, as engine.zero3_model does
    gpt2 = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(gpt2)
    shapes = sorted({tuple(p.shape) for p in model.parameters()})
    groups = parameter_groups(model, 0.1)
    ours = [[g["weight_decay"], len(g["params"]), sorted({parameter_ndim(p) for p in g["params"]})] for g in groups]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config, dist_init_required=False)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    out = {
        "partition_shapes": [list(s) for s in shapes],
        "groups": [g["weight_decay"] for g in inner.param_groups],
        "ours": ours,
        "type": type(inner).__name__,
    }
    print("RESULT " + json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def test_deepspeed_zero3_takes_the_groups(tmp_path: Path) -> None:
    """DeepSpeed's own initialize at world size 1: its torch AdamW gets our two groups, and the
    partitioned (empty, 1-D) ZeRO-3 parameters are still sorted by their real rank."""
    from launcher.runtime.model.tiny import cache_dir

    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29000 + os.getpid() % 1000),
        "TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions"),
    }
    script = tmp_path / "ds_groups.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["partition_shapes"] == [[0]]  # what p.ndim alone would see: every parameter 1-D
    assert result["ours"] == [[0.1, 6, [2]], [0.0, 10, [1]]]  # 6 matrices; 10 norm scales and biases
    assert result["groups"] == [0.1, 0.0] and result["type"] == "AdamW", result
