"""Per node host memory, per save checkpoint bytes and time, FLOPs per token and step time.

The rates are assumptions, written out with the numbers (estimate.txt says which): a GPU's dense
bf16 peak from its name, a model FLOPs utilisation, a file-system write bandwidth per node.
"""

from __future__ import annotations

from launcher.config.schema import CheckpointSection
from launcher.plan.estimate.memory import BYTES, GIB, Setting
from launcher.plan.estimate.params import count_params, shapes

# Dense bf16 tensor-core peak per GPU (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"h100-80gb": 989.0, "h200": 989.0, "a100-80gb": 312.0, "a100-40gb": 312.0, "l40s": 362.0, "a10g": 125.0, "l4": 121.0}
MFU = 0.40
FS_BYTES_PER_SECOND = 2.0e9  # written per node (each node writes its ranks' shards)
# What a shared file system takes from all nodes together: a save from 128 nodes is not 128 times
# faster than from one (cluster.fs_total_gbps overrides it).
FS_TOTAL_BYTES_PER_SECOND = 20.0e9
HOST_PER_RANK = 3.0 * GIB  # a rank's own process: torch, CUDA and NCCL host buffers, the model code
LOADER_PER_RANK = 0.25 * GIB  # prefetched batches and the memory-mapped index; the token cache itself is page cache


def host_bytes(s: Setting, memory: dict[str, float]) -> dict[str, float]:
    """Per node: offloaded (pinned) states, the ranks' processes, the data loaders."""
    ranks = s.topology.procs_per_node
    out = {"host_offloaded": memory["host_offloaded"], "host_processes": ranks * HOST_PER_RANK, "host_dataloader": ranks * LOADER_PER_RANK}
    out["host_total"] = sum(out.values())
    return out


def checkpoint_bytes(s: Setting, memory: dict[str, float], checkpoint: CheckpointSection | None = None) -> dict[str, float]:
    """One save, all ranks: the state the runtime writes, and the time at FS_BYTES_PER_SECOND per node."""
    trainable, total = memory["trainable_params"], memory["params"]
    c = BYTES[s.train.precision]
    adapter = s.method.peft
    if adapter:
        size = trainable * (4 + 8)  # trainable-only saves: fp32 adapters and their AdamW states
    elif s.parallel.backend == "deepspeed":
        size = total * c + trainable * (4 + 8)  # module states + fp32 masters and AdamW states
    else:
        size = total * 4 + trainable * 8  # fp32 parameters + AdamW states
    return {"checkpoint_bytes": size, "checkpoint_seconds": size / write_speed(s.topology.nodes)}


def write_speed(nodes: int, per_node_gbps: float | None = None, total_gbps: float | None = None) -> float:
    """Bytes per second one save is written at: each node at its speed (cluster.fs_bandwidth_gbps, else
    FS_BYTES_PER_SECOND), all of them together at most the file system's (cluster.fs_total_gbps)."""
    per_node = per_node_gbps * 1e9 if per_node_gbps else FS_BYTES_PER_SECOND
    total = total_gbps * 1e9 if total_gbps else FS_TOTAL_BYTES_PER_SECOND
    return min(per_node * max(nodes, 1), max(total, per_node))


def _forward_flops(s: Setting) -> float:
    """One forward per token: 2 per matmul weight, and causal attention (half of the S x S scores)."""
    counts = count_params(s.model, s.method, s.task, s.positions)
    _, layers, _, vocab, q, _ = shapes(s.model)
    head = (s.model.hidden_size or 0) * vocab if s.task != "classification" else 0
    attention = 2 * layers * s.seq_len * q  # QK^T and AV, causal: 2 x 2 flops x S/2 x width
    return float(2 * (counts.active_linear + head) + attention)  # MoE: the experts a token is routed to


def model_flops_per_token(s: Setting) -> float:
    """Training FLOPs per token as MFU counts them: the forward, and a backward of twice that (input
    and weight gradients; frozen weights need only the input one, so adapters' backward is one more
    forward's matmuls and the attention once more)."""
    forward = _forward_flops(s)
    if s.method.name in ("full", "freeze"):
        return 3 * forward
    _, layers, _, _, q, _ = shapes(s.model)
    return 2 * forward + 2 * layers * s.seq_len * q + step_reference_flops(s)


def reference_flops_per_token(s: Setting) -> float:
    """The reference pass (dpo, ipo) per token: one no-grad forward of the model without adapters,
    in every step (adapters) or over the first epoch once before step 1 (stored)."""
    return _forward_flops(s) if s.reference != "none" else 0.0


def step_reference_flops(s: Setting) -> float:
    """The part of the reference pass each training step does: all of it with adapters, none stored."""
    return reference_flops_per_token(s) if s.reference == "adapters" else 0.0


def flops_per_token(s: Setting) -> float:
    """What the hardware does per token: the model's FLOPs plus a second forward under full
    activation checkpointing (selective keeps matmul and attention outputs: nothing is redone)."""
    recompute = _forward_flops(s) if s.train.checkpointing == "full" else 0.0
    return model_flops_per_token(s) + recompute


def step_seconds(s: Setting, gpu: str, flops: float | None = None) -> float:
    """One step's seconds at `flops` per token (the step's own by default), a preference row holding
    a pair (twice the tokens the topology counts)."""
    peak = PEAK_TFLOPS.get(gpu, PEAK_TFLOPS["h100-80gb"]) * 1e12
    tokens = s.topology.tokens_per_step * s.row_len // s.seq_len
    return (flops_per_token(s) if flops is None else flops) * tokens / (s.topology.world_size * peak * MFU)
