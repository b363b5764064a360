"""DeepSpeed: the engine from the plan's deepspeed.json (nothing re-derived here), ZeRO-3 partitioned
construction, and checkpoints in the common layout. With zero_ops.py (its JIT builds) and
state/export.py (reading its checkpoints), the only modules that import deepspeed.

The loop drives the engine like the torch backends: the same loss (sum of token losses over the
global label-token count, times the world size because DeepSpeed averages over ranks), the same
learning-rate schedule (set on the optimizer's groups each step), `engine.step()` after every
micro-batch (DeepSpeed steps the optimizer at the accumulation boundary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config.schema import RunConfig
from launcher.plan import Plan
from launcher.runtime.state import checkpoint as ckpt

TAG = ckpt.DEEPSPEED_TAG
# Globals DeepSpeed's checkpoint files refer to beyond torch's weights-only set (measured on a
# ZeRO-3 save: loss scaler, stage enum; ZeRO-1/2 also record fragment addresses). Data classes.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def _prepare_environment() -> None:
    """Point DeepSpeed's JIT builds at the project cache and let it adopt our process group."""
    from launcher.runtime.parallel.zero_ops import extensions_dir

    # JIT builds (CPU Adam) land in the project cache, where the prepare step built them (zero_ops.py).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        # DeepSpeed compiles a shared-memory all-reduce on CPU (minutes on a fresh machine) that
        # only its inference all-reduce uses; training collectives go through gloo either way.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


_HF_DEEPSPEED: list[Any] = []  # transformers holds a weak reference; keep the object alive


def zero3_model(
    path: Path,
    cfg: RunConfig,
    plan: Plan,
    attn_implementation: str,
    device: torch.device,
    labels: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load under ZeRO-3 partitioning: transformers builds inside zero.Init (each rank allocates only
    its partition) and fills the weights partition by partition."""
    _prepare_environment()
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.runtime.model.build import hf_config, model_class, reinit_buffers

    _HF_DEEPSPEED[:] = [HfDeepSpeedConfig(plan.deepspeed)]
    config = hf_config(path, cfg.model, labels)
    model = model_class(cfg.task).from_pretrained(
        path, config=config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    reinit_buffers(model, device)
    held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"launcher: ZeRO-3: built inside zero.Init; this rank holds {held / max(total, 1):.0%} of the {total:,} parameters", flush=True
        )
    return model


def deepspeed_engine(model: nn.Module, plan: Plan, cfg: RunConfig) -> Any:
    _prepare_environment()
    import deepspeed

    assert plan.deepspeed is not None
    from launcher.runtime.parallel.optim import parameter_groups

    # The torch backends' groups (no decay on 1-D parameters); each group's weight_decay overrides the config's.
    groups = parameter_groups(model, cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=plan.deepspeed, dist_init_required=False)
    return engine


class DeepSpeedSaver(ckpt.Saver):
    """DeepSpeed's own sharded files under step-N/deepspeed/, with our manifest and COMPLETE."""

    def __init__(self, root: Path, rank: int, keep_last: int, engine: Any, trainable_only: bool = False) -> None:
        super().__init__(root, rank, keep_last, trainable_only=trainable_only)
        self.engine = engine

    def save(self, model: nn.Module, optimizer: Any, manifest: dict[str, Any]) -> Path:
        with ckpt.save_errors(ckpt.step_dir(self.root, manifest["step"]), self.rank):  # ENOSPC & co.: one line
            folder = self.begin(manifest["step"])
            self._started = time.monotonic()  # the manifest's save_seconds (plan/budget.py) and the printed time
            self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=self.trainable_only)
            self._finish(folder, manifest)
        return folder


def load_deepspeed(folder: Path, engine: Any, rank: int, trainable_only: bool = False) -> dict[str, Any]:
    manifest = ckpt.read_manifest(folder)
    world = torch.distributed.get_world_size()
    if manifest["world_size"] != world:
        raise ckpt.CheckpointError(
            f"checkpoint.resume: {folder} was saved by DeepSpeed at world size {manifest['world_size']}, this run has {world}; "
            f"convert it first: python -m deepspeed.checkpoint.ds_to_universal --input_folder {folder / TAG} "
            f"--output_folder {folder}-universal, or resume at world size {manifest['world_size']} (FSDP2 checkpoints reshard by themselves)"
        )
    # DeepSpeed reads its files with weights_only=False: scan them first (runtime/state/safe_state.py).
    ckpt.refuse_foreign_pickles(folder / TAG, DEEPSPEED_GLOBALS)
    path, _ = engine.load_checkpoint(
        str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=not trainable_only
    )
    if path is None:
        raise ckpt.CheckpointError(f"checkpoint.resume: DeepSpeed could not load {folder / TAG}")
    ckpt.load_rng(folder, rank)  # JSON, never a pickle
    return manifest


def backward_and_step(engine: Any, loss: torch.Tensor) -> None:
    """One micro-batch: DeepSpeed's backward (the loss already carries the accumulation scale, so its
    own division is off), then its step, which steps the optimizer, clipped, at the accumulation boundary."""
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def grad_norm(engine: Any) -> Any:
    """The norm DeepSpeed measured at the boundary (a device tensor under ZeRO), 0.0 when it has none."""
    norm = engine.get_global_grad_norm()
    return norm if norm is not None else 0.0
