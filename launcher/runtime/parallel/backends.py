"""Model + optimizer (+ engine) for a plan, and how that backend saves and loads checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.config.schema import CheckpointSection, RunConfig
from launcher.plan import Plan
from launcher.runtime.model.blocks import apply_checkpointing, compile_blocks
from launcher.runtime.model.build import DTYPES, WeightMap, build_on_meta, load_weights, materialize
from launcher.runtime.model.methods import apply_method
from launcher.runtime.parallel.dist import DistInfo
from launcher.runtime.parallel.native import parameter_device, shard_model, wrap_ddp
from launcher.runtime.parallel.optim import build_optimizer
from launcher.runtime.state import checkpoint as ckpt


@dataclass
class Built:
    model: nn.Module
    optimizer: Any
    engine: Any = None
    trainable_only: bool = False  # checkpoints hold only trainable state (adapter methods)

    def saver(self, root: Path, info: DistInfo, checkpoint: CheckpointSection) -> Any:
        if self.engine is not None:
            from launcher.runtime.parallel.zero import DeepSpeedSaver

            return DeepSpeedSaver(root, info.rank, checkpoint.keep_last, self.engine, self.trainable_only)
        # Asynchronous saves: one gloo group for DCP's background writes, another for the step's poll.
        group, poll_group = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo")) if checkpoint.async_save else (None, None)
        return ckpt.Saver(
            root,
            info.rank,
            checkpoint.keep_last,
            async_save=checkpoint.async_save,
            group=group,
            poll_group=poll_group,
            trainable_only=self.trainable_only,
        )

    def load(self, folder: Path, rank: int) -> dict[str, Any]:
        if self.engine is not None:
            from launcher.runtime.parallel.zero import load_deepspeed

            return load_deepspeed(folder, self.engine, rank, self.trainable_only)
        return ckpt.load(folder, self.model, self.optimizer, rank, self.trainable_only)


def build_training_model(
    plan: Plan, cfg: RunConfig, info: DistInfo, path: Path, attn_implementation: str, labels: list[str] | None = None
) -> Built:
    """meta → method → shard → load, for any architecture and task; `labels` names a classifier's classes."""
    backend, method, task = cfg.parallel.backend, cfg.method, cfg.task
    adapters = method.peft
    checkpointing = cfg.train.checkpointing
    # Trainable weights are fp32 masters (the compute dtype comes from the mixed-precision policy);
    # an adapter method's frozen base stays in its storage dtype.
    frozen_dtype = DTYPES[cfg.model.dtype] if method.name in ("lora", "prompt_tuning") else torch.float32
    if method.name == "qlora":
        from launcher.runtime.model.qlora import build_qlora

        # meta → quantised skeleton → LoRA → shard → fill: each rank quantises one tensor at a
        # time and keeps its shard of the packed data (never the whole 4-bit base under FSDP2).
        home = parameter_device(plan.fsdp, info.device)
        model = build_qlora(path, cfg, info, attn_implementation, lambda m: shard_model(m, backend, plan.fsdp, info), home)
    elif backend == "deepspeed" and cfg.parallel.zero_stage == 3 and (method.name in ("full", "freeze") or _zero3_lora(cfg)):
        from launcher.runtime.parallel.zero import zero3_model

        # LoRA: the frozen base partitioned as it loads; the adapters (new, small) are partitioned
        # by deepspeed.initialize like any parameter outside zero.Init.
        model = zero3_model(path, cfg, plan, attn_implementation, info.device, labels, frozen_dtype)
        model = apply_method(model, method, cfg.model.layer_class, task)
        if method.name == "lora":
            from launcher.runtime.model.methods import init_adapters

            init_adapters(model, cfg.run.seed)
        apply_checkpointing(model, checkpointing)
    else:
        model = build_on_meta(path, cfg.model, attn_implementation, frozen_dtype, task, labels)
        weights = WeightMap.of(model, task)  # before peft and sharding: keys → modules
        model = apply_method(model, method, cfg.model.layer_class, task)
        apply_checkpointing(model, checkpointing)
        if cfg.train.compile:  # after checkpointing, before sharding (torchtitan's order); validate refuses DeepSpeed and QLoRA
            compile_blocks(model, cfg.model.layer_class)
        model = shard_model(model, backend, plan.fsdp, info)
        materialize(model, parameter_device(plan.fsdp, info.device), buffer_device=info.device)
        load_weights(model, weights, path, cfg.run.seed)
        if method.name in ("lora", "prompt_tuning"):
            from launcher.runtime.model.methods import init_adapters

            init_adapters(model, cfg.run.seed)
    if cfg.kernels.liger:  # Liger's RMSNorm / SwiGLU / RoPE on this instance: parameters untouched, before any wrapper
        from launcher.kernels.liger import apply_liger_patches

        apply_liger_patches(model)
    if backend == "deepspeed":
        from launcher.runtime.parallel.zero import deepspeed_engine

        engine = deepspeed_engine(model, plan, cfg)
        return Built(model=engine, optimizer=engine.optimizer, engine=engine, trainable_only=adapters)
    if backend == "ddp":
        model = wrap_ddp(model, info)
    return Built(model=model, optimizer=build_optimizer(model, cfg.optim), trainable_only=adapters)


def _zero3_lora(cfg: RunConfig) -> bool:
    """LoRA under ZeRO-3 builds inside zero.Init, for a causal LM. A classifier's head is trained in
    full beside the adapters, which a partitioned parameter does not survive: validation refuses a
    classifier's LoRA under ZeRO-3 rather than build its whole base on every rank."""
    return cfg.method.name == "lora" and cfg.task in ("causal_lm", "preference")
