"""Activation checkpointing (none | full | selective) and torch.compile per block, in one process:
the same loss and gradients as plain eager, the memory ordering full < selective < none, the same
under FSDP2 and DDP (world size 1, gloo), and the recipe values and refusals."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from _archs import SHAPES
from _support import kept_bytes

from launcher.config import ConfigError, load_config
from launcher.runtime.model.blocks import apply_checkpointing, compile_blocks, saved_ops, selective_policy

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


@pytest.fixture(scope="module")
def tiny() -> transformers.PreTrainedModel:
    """The tests' tiny Llama shape (2 blocks, hidden 64, GQA 4/2), fp32, random weights, in training mode."""
    class_name, shape = SHAPES["llama"]
    config = getattr(transformers, class_name)(vocab_size=1024, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().train()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (2, 48), generator=generator)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2: a DTensor
    return loss.detach(), grads


def assert_same(got: tuple[torch.Tensor, dict[str, torch.Tensor]], want: tuple[torch.Tensor, dict[str, torch.Tensor]], tol: float) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol)
    names = [n.removeprefix("module.") for n in got[1]]
    assert names == list(want[1]), "a parameter lost or renamed"
    for name, grad in zip(names, got[1].values(), strict=True):
        torch.testing.assert_close(grad, want[1][name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def eager(tiny: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return loss_and_grads(copy.deepcopy(tiny), batch)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_gradients_equal_eager(mode: str, tiny: torch.nn.Module, batch: dict[str, torch.Tensor], eager: tuple) -> None:
    model = copy.deepcopy(tiny)
    apply_checkpointing(model, mode)
    assert all(getattr(block, "gradient_checkpointing", False) for block in model.model.layers)
    assert_same(loss_and_grads(model, batch), eager, 1e-6)


def test_selective_keeps_less_than_none_and_more_than_full(tiny: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Bytes one forward leaves alive for backward: full keeps each block's input, selective the
    matmul and attention outputs too, none everything."""
    kept = {}
    for mode in ("none", "full", "selective"):
        model = copy.deepcopy(tiny)
        apply_checkpointing(model, mode)
        kept[mode] = kept_bytes(model, input_ids=batch["input_ids"], use_cache=False)
    assert kept["full"] < kept["selective"] < kept["none"], kept
    # every linear's output kept (hidden 64, q 64, k/v 32, gate/up 128, o/down 64), 96 tokens, fp32, two blocks
    matmuls = 2 * 96 * 4 * (64 + 2 * 32 + 64 + 2 * 128 + 64)
    assert kept["selective"] - kept["full"] >= matmuls, kept


def test_policy_saves_matmuls_and_attention_only() -> None:
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert op in saved_ops()
        assert selective_policy(None, op) == CheckpointPolicy.MUST_SAVE
    for op in (aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten.add.Tensor):
        assert selective_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """A world of one over gloo, so FSDP2 and DDP run in this process."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_selective_under_fsdp2_and_ddp(
    backend: str, one_rank: None, tiny: torch.nn.Module, batch: dict[str, torch.Tensor], eager: tuple
) -> None:
    """The runtime's own sharding (native.py) around selectively checkpointed blocks: same gradients."""
    from launcher.runtime.parallel.dist import DistInfo
    from launcher.runtime.parallel.native import apply_fsdp, wrap_ddp

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = copy.deepcopy(tiny)
    apply_checkpointing(model, "selective")
    if backend == "fsdp":
        fsdp = {
            "mesh": {"dim_names": ["shard"], "shape": [1]},
            "mixed_precision": {"param_dtype": "float32", "reduce_dtype": "float32"},
            "cpu_offload": False,
            "shard_module_class": "LlamaDecoderLayer",
            "reshard_after_forward": True,
            "reshard_root_after_forward": False,
        }
        model = apply_fsdp(model, fsdp, info)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # torch 2.13 warns on every rank about a deprecated DDP argument
            model = wrap_ddp(model, info)
        assert model.broadcast_buffers is False  # no collective before each forward (rotary tables are alike everywhere)
    assert_same(loss_and_grads(model, batch), eager, 1e-6)


def has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler; none found")
def test_compiled_blocks_equal_eager(tiny: torch.nn.Module, batch: dict[str, torch.Tensor], eager: tuple) -> None:
    """Compiled blocks (inductor, with the selective policy applied by its partitioner): the same
    loss and gradients as eager within float32 rounding; module names are unchanged."""
    torch._dynamo.reset()
    model = copy.deepcopy(tiny)
    apply_checkpointing(model, "selective")
    assert compile_blocks(model) == 2
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    assert_same(loss_and_grads(model, batch), eager, 1e-5)


def test_recipe_values() -> None:
    tiny = RECIPES / "tiny-cpu.yaml"
    modes = {
        v: load_config(tiny, [f"train.activation_checkpointing={v}"]).train.checkpointing for v in ("false", "true", "full", "selective")
    }
    assert modes == {"false": "none", "true": "full", "full": "full", "selective": "selective"}
    assert load_config(tiny, ["train.activation_checkpointing=selective"]).train.activation_checkpointing == "selective"
    with pytest.raises(ConfigError) as bad:
        load_config(tiny, ["train.activation_checkpointing=partial"])
    assert "train.activation_checkpointing" in str(bad.value) and "'full', 'selective'" in str(bad.value)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [("tiny-cpu-deepspeed.yaml", "not supported with DeepSpeed"), ("tiny-cpu-qlora.yaml", "bitsandbytes' 4-bit layers")],
)
def test_compile_refused_where_it_cannot_work(recipe: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(RECIPES / recipe, ["train.compile=true"])
    assert "train.compile" in str(refused.value) and expected in str(refused.value)
    assert load_config(RECIPES / "tiny-cpu.yaml", ["train.compile=true"]).train.compile
