"""torch's own backends, FSDP2, DDP and one process: one `match` on the backend to wrap (fully_shard |
DDP | none; DeepSpeed wraps in zero.py).

Also the one place that knows how these backends accumulate, clip and step, so the loop stays
backend-agnostic: `grad_sync(model, backend, last)`, `loss_scale(...)` and `clip_and_step(...)`
(DeepSpeed's counterparts: zero.py's `backward_and_step` and `grad_norm`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from launcher.runtime.model.build import DTYPES, find_blocks
from launcher.runtime.parallel.dist import DistInfo


def apply_fsdp(model: nn.Module, fsdp: dict[str, Any], info: DistInfo) -> nn.Module:
    """FSDP2: one unit per block (decoder / encoder layer), then the root; mesh and policies from the plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh_spec = fsdp["mesh"]
    mesh = init_device_mesh(info.device.type, tuple(mesh_spec["shape"]), mesh_dim_names=tuple(mesh_spec["dim_names"]))
    mixed = fsdp["mixed_precision"]
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mixed["param_dtype"]], reduce_dtype=DTYPES[mixed["reduce_dtype"]])
    offload: OffloadPolicy = CPUOffloadPolicy() if fsdp["cpu_offload"] else OffloadPolicy()
    common: dict[str, Any] = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}
    layers = find_blocks(model, fsdp["shard_module_class"])
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        reshard = fsdp["reshard_after_forward"] and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, **common)
    fully_shard(model, reshard_after_forward=fsdp["reshard_root_after_forward"], **common)
    return model


def parameter_device(fsdp: dict[str, Any] | None, device: torch.device) -> torch.device:
    """Where the rank's parameters are materialised and loaded: the host when FSDP2 offloads them
    (CPUOffloadPolicy expects its sharded parameters in CPU memory: materialised on the GPU, the
    DTensor would still say cuda and the first forward fails), else the rank's device (torchtitan
    builds on the CPU when offloading too)."""
    return torch.device("cpu") if fsdp is not None and fsdp.get("cpu_offload") else device


def shard_model(model: nn.Module, backend: str, fsdp: dict[str, Any] | None, info: DistInfo) -> nn.Module:
    match backend:
        case "fsdp":
            assert fsdp is not None
            return apply_fsdp(model, fsdp, info)
        case "ddp" | "single" | "deepspeed":
            return model  # DDP wraps after materialisation (wrap_ddp); DeepSpeed in zero.py
    raise AssertionError(backend)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP without a collective before each forward: the models' buffers (rotary tables, position
    ids) are computed alike on every rank and never change, so they are not broadcast from rank 0
    each step; gradients are views into the all-reduce buckets (no copy into the bucket and back)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # torch 2.13 renamed the switch (and warns on every rank about the old name); older torch has only the old one.
    per_forward = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    )
    kwargs: dict[str, Any] = {per_forward: False}
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **kwargs)


@contextlib.contextmanager
def grad_sync(model: nn.Module, backend: str, last_micro_batch: bool, defer_fsdp: bool = False) -> Iterator[None]:
    """When gradients are reduced within an accumulation window.

    FSDP2 reduce-scatters after every micro-batch by default (as torchtitan and torchtune do): with
    sync off it would hold every parameter's unsharded fp32 gradient until the window ends (about
    +32 GB per GPU at 8B). `defer_fsdp` (parallel.fsdp.defer_grad_sync) trades that memory for fewer
    collectives. DDP skips the all-reduce until the last micro-batch (its gradients are full-size anyway).
    """
    if backend == "fsdp":
        model.set_requires_gradient_sync(last_micro_batch or not defer_fsdp)  # type: ignore[operator]
        yield
    elif backend == "ddp" and not last_micro_batch:
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def loss_scale(backend: str, world_size: int) -> float:
    """Factor that turns (sum of token losses / global label tokens) into what each backend expects.

    FSDP and DDP average gradients over ranks, so each rank's share is multiplied by the world size
    to make the reduced gradient the gradient of the global token-mean loss. DeepSpeed averages too;
    its engine.backward would also divide by the accumulation steps, which zero.py turns off.
    """
    return float(world_size) if backend in ("fsdp", "ddp", "deepspeed") else 1.0


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> torch.Tensor:
    """Clip the trainable gradients to `max_grad_norm` (none: measure only), step, zero the gradients;
    returns the norm before clipping (an FSDP2 DTensor norm made whole), a tensor the caller reads
    when it logs."""
    max_norm = max_grad_norm or math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
