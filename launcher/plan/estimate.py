"""Memory (and rough time) per GPU for a plan: parameters, gradients, optimizer, activations.

A planning aid, not a promise: it counts what each backend keeps resident per rank (sharded or
not), the activations a micro-batch saves for backward (with or without activation
checkpointing), the logits, and a fixed allowance for the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import MethodSection, ModelSection, ParallelSection, TrainSection
from launcher.plan.topology import Topology

GIB = 1024**3
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
NF4_BYTES = 0.5 + 1 / 64  # 4 bits + double-quantised absmax per 64-block
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, NCCL buffers, allocator slack
ASSUMED_TFLOPS = 989e12 * 0.40  # H100 dense bf16 at 40 % MFU: an assumption, shown as such


@dataclass(frozen=True)
class ParamCounts:
    total: int
    linear: int  # decoder-layer linear weights (what QLoRA quantises)
    per_layer: int
    lora: int  # adapter parameters for the configured targets


def count_params(model: ModelSection, method: MethodSection) -> ParamCounts:
    h, layers, inter, vocab = model.hidden_size, model.num_layers, model.intermediate_size, model.vocab_size
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    assert h and layers and inter and vocab and heads and kv_heads, "resolve() first"
    kv = kv_heads * (h // heads)
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    linear_per_layer = sum(i * o for i, o in shapes.values())
    per_layer = linear_per_layer + 2 * h
    embeddings = vocab * h * (1 if model.tie_word_embeddings else 2)
    targets = _LINEARS if "all-linear" in method.lora.target_modules else [t for t in method.lora.target_modules if t in shapes]
    lora = layers * sum(method.lora.r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return ParamCounts(total=layers * per_layer + embeddings + h, linear=layers * linear_per_layer, per_layer=per_layer, lora=lora)


def estimate_memory(
    model: ModelSection,
    method: MethodSection,
    parallel: ParallelSection,
    train: TrainSection,
    seq_len: int,
    topology: Topology,
    cuda: bool = True,
) -> dict[str, float]:
    """Bytes per rank, by component, plus `total`."""
    counts = count_params(model, method)
    world = topology.world_size
    compute = _BYTES[train.precision]
    stage = parallel.zero_stage if parallel.backend == "deepspeed" else {"fsdp": 3, "ddp": 0, "single": 0}[parallel.backend]
    shard_params, shard_grads, shard_optim = (world if stage >= 3 else 1), (world if stage >= 2 else 1), (world if stage >= 1 else 1)

    if method.name in ("lora", "qlora", "prompt_tuning"):
        virtual = method.prompt_tuning.num_virtual_tokens * (model.hidden_size or 0)
        trainable: float = counts.lora if method.name != "prompt_tuning" else virtual
        frozen_linear_bytes = counts.linear * (NF4_BYTES if method.name == "qlora" else _BYTES[model.dtype])
        frozen_other = (counts.total - counts.linear) * _BYTES[model.dtype]
        weights = (frozen_linear_bytes + frozen_other) / shard_params + trainable * 4
        grads = trainable * 4
        optimizer = trainable * 8
    else:
        trainable = float(counts.total)
        if method.name == "freeze":
            trainable = method.freeze.trainable_last_layers * counts.per_layer + (
                (model.vocab_size or 0) * (model.hidden_size or 0) if method.freeze.train_head else 0
            )
        master = 4  # fp32 master weights for mixed precision
        working = compute if parallel.backend == "deepspeed" and train.precision != "fp32" else 0
        weights = counts.total * (master + working) / shard_params
        grads = trainable * (compute if parallel.backend == "deepspeed" else 4) / shard_grads
        optimizer = trainable * 8 / shard_optim
        if parallel.backend == "fsdp":
            # Two decoder layers gathered at a time (current + prefetched), in the compute dtype.
            weights += 2 * counts.per_layer * compute * (1 if parallel.fsdp.reshard_after_forward else model.num_layers or 1)
    if parallel.offload_optimizer != "none":
        optimizer = 0.0
    if parallel.offload_params != "none":
        weights = 2 * counts.per_layer * compute

    tokens = train.micro_batch_size * seq_len if train.micro_batch_size else seq_len
    h, inter, layers = model.hidden_size or 0, model.intermediate_size or 0, model.num_layers or 0
    kv = (model.num_key_value_heads or 0) * (h // (model.num_attention_heads or 1))
    per_token_layer = (8 * h + 2 * kv + 4 * inter) * compute  # tensors saved for backward per layer
    if train.activation_checkpointing:
        activations = tokens * (layers * h * compute + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    logits = tokens * (model.vocab_size or 0) * 4 * 2  # fp32 logits and their gradient
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
        "context": CONTEXT_BYTES if cuda else 0.0,
    }
    parts["total"] = sum(parts.values())
    parts["params"] = counts.total
    parts["trainable_params"] = trainable
    return parts


def step_seconds(memory: dict[str, float], method: MethodSection, train: TrainSection, topology: Topology) -> float:
    """Rough seconds per optimizer step on H100-class GPUs (6 FLOPs/param/token, 8 with recompute)."""
    flops_per_token = 4 if method.name in ("lora", "qlora", "prompt_tuning") else 6
    if train.activation_checkpointing:
        flops_per_token += 2
    total = flops_per_token * memory["params"] * topology.tokens_per_step
    return total / (ASSUMED_TFLOPS * topology.world_size)


def render_estimate(memory: dict[str, float], seconds: float | None) -> str:
    lines = [f"parameters: {_count(memory['params'])} ({_count(memory['trainable_params'])} trainable)", "memory per rank:"]
    for key in ("weights", "gradients", "optimizer", "activations", "logits", "context", "total"):
        lines.append(f"  {key:<12} {memory[key] / GIB:9.2f} GiB")
    if seconds is not None:
        lines.append(f"time per step: ~{seconds:.2f} s (H100 bf16 at 40 % MFU, assumed)")
    return "\n".join(lines) + "\n"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
