"""RunConfig slices → a DeepSpeed config dict with every value resolved (no "auto" anywhere).

The learning-rate schedule is not here: the runtime's loop sets the rate for every backend alike,
so DeepSpeed gets no scheduler block.
"""

from __future__ import annotations

from typing import Any

from launcher.config.schema import ModelSection, OptimSection, ParallelSection, TrainSection
from launcher.plan.topology import Topology

# Logging every step would flood the logs; the runtime logs steps itself.
_QUIET_STEPS = 1_000_000_000


def build_deepspeed_config(
    parallel: ParallelSection, train: TrainSection, optim: OptimSection, model: ModelSection, topology: Topology
) -> dict[str, Any]:
    assert model.hidden_size is not None, "resolve() first"
    hidden = model.hidden_size
    stage = parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Bucket sizes follow the hidden size, as the Hugging Face Trainer derives them for "auto".
        zero.update(
            {
                "overlap_comm": stage >= 2,
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "reduce_bucket_size": hidden * hidden,
                "allgather_partitions": True,
                "allgather_bucket_size": max(hidden * hidden, 50_000_000) if stage < 3 else hidden * hidden,
            }
        )
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "sub_group_size": 1_000_000_000,
                # Without this, a ZeRO-3 save of LoRA adapters writes empty tensors.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if parallel.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(parallel.offload_optimizer, parallel.nvme_path)
    if parallel.offload_params != "none":
        zero["offload_param"] = _offload(parallel.offload_params, parallel.nvme_path)

    offloaded = parallel.offload_optimizer != "none"
    optimizer_params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": [optim.beta1, optim.beta2],
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not offloaded:
        # torch.optim.AdamW: no JIT-built FusedAdam; offload needs DeepSpeed's CPU Adam instead.
        optimizer_params["torch_adam"] = True

    config: dict[str, Any] = {
        "train_batch_size": topology.global_batch_size,
        "train_micro_batch_size_per_gpu": topology.micro_batch_size,
        "gradient_accumulation_steps": topology.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": _fp16(train.precision == "fp16"),
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
    }
    if offloaded:
        config["zero_force_ds_cpu_optimizer"] = True
    return config


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    block: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    return block


def _fp16(enabled: bool) -> dict[str, Any]:
    if not enabled:
        return {"enabled": False}
    # Dynamic loss scaling with DeepSpeed's documented defaults, written out.
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
