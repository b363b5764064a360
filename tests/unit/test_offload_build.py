"""FSDP2 CPU offload builds on the host (issue 24): CPUOffloadPolicy expects its sharded parameters in
CPU memory, so the build materialises and loads them there, and the buffers (rotary tables) on the
rank's GPU. No GPU here: a CUDA device is what the build is told, the sharding is left out (FSDP2
needs the device to exist), and what the build asks of `materialize` is checked; materialize itself
is run for real with the meta device standing in for the GPU. tests/gpu runs the whole thing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from launcher.plan import build_plan
from launcher.runtime.model import build as model_build
from launcher.runtime.model.tiny import ensure_tiny_model
from launcher.runtime.parallel import backends
from launcher.runtime.parallel.dist import DistInfo
from launcher.runtime.parallel.native import parameter_device

CUDA = torch.device("cuda", 0)


def test_offloaded_parameters_live_on_the_host() -> None:
    assert parameter_device({"cpu_offload": True}, CUDA) == torch.device("cpu")
    assert parameter_device({"cpu_offload": False}, CUDA) == CUDA
    assert parameter_device(None, CUDA) == CUDA  # DDP, one process, DeepSpeed: no FSDP2 plan


def test_materialize_puts_parameters_and_buffers_where_each_belongs() -> None:
    path = ensure_tiny_model()
    cfg = load_config("tiny-cpu.yaml")
    model = model_build.build_on_meta(path, cfg.model, "sdpa", torch.float32, "causal_lm", None)
    assert any(b is not None for b in model.buffers())  # rotary tables: real, computed on the CPU
    model_build.materialize(model, torch.device("cpu"), buffer_device=torch.device("meta"))  # meta: the GPU's stand-in
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"meta"}


@pytest.mark.parametrize("offload", [True, False])
def test_the_build_asks_for_host_parameters_only_when_offloading(offload: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = ensure_tiny_model()
    cfg = load_config("tiny-cpu.yaml", ["cluster.gpus_per_node=1", f"model.name_or_path={path}"])
    plan = build_plan(cfg, str(tmp_path / "run"))
    plan = dataclasses.replace(plan, fsdp={**plan.fsdp, "cpu_offload": offload})
    asked: list[tuple[torch.device, torch.device | None]] = []

    def spy(model: torch.nn.Module, device: torch.device, buffer_device: torch.device | None = None) -> None:
        asked.append((device, buffer_device))
        model_build.materialize(model, torch.device("cpu"))  # what exists here, so the build goes on

    monkeypatch.setattr(backends, "shard_model", lambda model, *a: model)  # FSDP2 on a CUDA mesh: not here
    monkeypatch.setattr(backends, "materialize", spy)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=CUDA)
    backends.build_training_model(plan, cfg, info, path, "sdpa")
    assert asked == [(torch.device("cpu") if offload else CUDA, CUDA)]
