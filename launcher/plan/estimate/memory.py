"""Bytes per GPU, item by item, for what the runtime holds (runtime/parallel/backends.py, native.py, loop.py).

Each item is what the launcher's runtime allocates for it, not a textbook rule:
- FSDP2 keeps fp32 master parameters sharded (runtime/parallel/backends.py builds full/freeze in fp32, LoRA's
  frozen base in model.dtype), fp32 sharded gradients, AdamW's two fp32 states (with CPU offload all
  of them, a 4-bit base's packed shards included, in host memory); it all-gathers a
  block (and the next, prefetched) in the compute dtype, and the root unit (embeddings, final norm,
  LM head) stays gathered for the whole step (`reshard_root_after_forward: false`). With
  `parallel.fsdp.defer_grad_sync` every parameter's unsharded gradient is kept in the reduce dtype
  across the accumulation window.
- DeepSpeed casts the module to the compute dtype; ZeRO-1/2/3 partition the fp32 masters, AdamW
  states (and gradients from 2, parameters at 3); offload moves masters, states and fp32 gradients
  to pinned host memory.
- Activations are the tensors saved for backward per token, counted from the ops HF's blocks run
  (tests/unit/test_estimate.py holds them to `saved_tensors_hooks`).
- A preference row is a pair (chosen and rejected, each up to max_seq_len): twice the tokens of a
  causal-LM row, scored through full fp32 logits (runtime/train/preference.py). Its reference pass
  (dpo, ipo) is a no-grad forward: it saves nothing for backward and its logits peak is below the
  loss's, so it adds no item here; it costs compute (cost.py), and a stored reference costs 8 bytes
  per sequence on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import KernelsSection, MethodSection, ModelSection, ParallelSection, TrainSection
from launcher.plan.estimate.params import ParamCounts, block_linears, count_params, family_of, mlp_width, shapes, trainable_params
from launcher.plan.topology import Topology

GIB = 1024**3
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
NF4_PACKED = 0.5  # two 4-bit weights per byte
NF4_STATE = 1 / 64 + 4 / (64 * 256)  # double-quantised absmax: a byte per 64-block, fp32 per 256 blocks
NF4_TABLES = 4 * (16 + 256 + 1)  # per module: the NF4 code, the nested 8-bit code and its offset (fp32)
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS workspace, NCCL's device buffers
FRAGMENTATION = 0.08  # caching-allocator slack, as a share of everything counted above it
TOKEN_CHUNK, VOCAB_CHUNK = 2048, 8192  # kernels/src/loss.py's blocks
POST_PROCESSED_LOGITS = frozenset({"gemma2", "gemma3", "gemma3_text", "cohere", "cohere2", "granite"})  # keep the plain loss


@dataclass(frozen=True)
class Setting:
    """What the memory model needs, sliced from the RunConfig."""

    model: ModelSection
    method: MethodSection
    parallel: ParallelSection
    train: TrainSection
    kernels: KernelsSection
    seq_len: int
    topology: Topology
    cuda: bool = True
    task: str = "causal_lm"
    positions: int | None = None  # learned position rows (GPT-2, BERT); None: read or defaulted
    # preference: none (orpo, simpo; other tasks) | adapters (the base with the adapters off, a no-grad
    # forward of every micro-batch) | stored (a no-grad forward of the first epoch, once before step 1)
    reference: str = "none"

    @property
    def row_len(self) -> int:
        """Tokens one row holds at most: a preference row is a pair, each sequence up to seq_len."""
        return 2 * self.seq_len if self.task == "preference" else self.seq_len


def shard_group(s: Setting) -> int:
    """Ranks one parameter is sharded over: the node under HSDP, else the world."""
    if s.parallel.backend == "fsdp":
        return s.topology.procs_per_node if s.parallel.fsdp.hsdp else s.topology.world_size
    return s.topology.world_size if s.parallel.backend == "deepspeed" else 1


def loss_kind(s: Setting) -> str:
    """plain | chunked | none, as kernels/src/loss.py `choose` decides it on the cluster (a preference
    run takes every position's log-softmax of the full logits: plain)."""
    if s.task == "preference":
        return "plain"
    if s.task != "causal_lm":
        return "none"
    if s.kernels.loss == "plain" or s.method.name == "prompt_tuning" or s.model.architecture in POST_PROCESSED_LOGITS:
        return "plain"
    return "chunked"  # chunked, liger (same blocks), auto (either)


def attention_kind(s: Setting) -> str:
    return "eager" if s.kernels.attention == "eager" else "flash"  # flash, our per-document SDPA: no dense mask


def block_saved_bytes(s: Setting, counts: ParamCounts, mode: str) -> float:
    """Bytes saved for backward per token by one block: mode none | selective | full (checkpointed);
    selective is runtime/model/blocks.py's op-level policy (matmul and attention outputs kept)."""
    h, _, _, _, q, kv = shapes(s.model)
    inter = mlp_width(s.model)  # MoE: the routed experts' (and a shared expert's) widths
    c = BYTES[s.train.precision]
    fam = family_of(s.model)
    heads = s.model.num_attention_heads or 1
    if mode == "full":
        return c * h  # the block's input, kept by the checkpoint
    frozen = s.method.low_rank  # a frozen base saves nothing for its own weight gradients
    if fam.layer_norm:  # input and two statistics; the output too when the next linear trains
        norms = 2 * (c * h + 8 + (0 if frozen else c * h))
    else:  # RMSNorm in fp32: the fp32 input and rsqrt; with a trained weight also the normalised value and output
        norms = 2 * (4 * h + 4 + (0 if frozen else 2 * c * h))
    core = c * q + 4 * heads  # attention output and logsumexp
    if attention_kind(s) == "eager":
        core += heads * s.row_len * (4 + c)  # fp32 softmax and its cast, per query token (over the whole row)
    mlp = (fam.mlp_saved - (1 if frozen else 0)) * c * inter  # frozen: the down projection's input is not kept
    saved: float = norms + c * (q + 2 * kv) + mlp + core
    if frozen:
        saved = saved + lora_saved_bytes(s, counts, c)
    if mode == "selective":
        # the block's input (kept by the checkpoint), attention's output and logsumexp (eager:
        # the scores' and the values' matmuls), every linear's output; the rest is recomputed
        outputs = q + 2 * kv + h + (2 if fam.gated_mlp else 1) * inter + h
        attention = c * q + (c * heads * s.row_len if attention_kind(s) == "eager" else 4 * heads)
        adapters = 4 * sum(s.method.lora.r + o for _, o, _ in counts.lora_modules) if frozen else 0  # fp32 lora_A, lora_B outputs
        return c * h + attention + c * outputs + adapters
    return saved


def lora_saved_bytes(s: Setting, counts: ParamCounts, c: int) -> float:
    """What peft's LoRA layers keep per token: each adapter's fp32 input (its own cast copy when the
    compute dtype is not fp32; with dropout, the dropped copy and its mask) and lora_A's output."""
    adapter = 4  # peft keeps LoRA weights in fp32 and casts the input to them
    r = s.method.lora.r
    if s.method.lora.dropout > 0:
        mask = 1 if s.cuda else adapter  # CUDA's fused dropout keeps a bool mask, the CPU one a scaled noise tensor
        return sum((adapter + mask) * i + adapter * r for i, _, _ in counts.lora_modules)
    if c != adapter:
        return sum(adapter * i + adapter * r for i, _, _ in counts.lora_modules)
    # fp32 compute without dropout: the adapters read the block's own tensors, each saved once;
    # the attention output is saved by attention already
    inputs = {source: i for i, _, source in counts.lora_modules if source != "attention"}
    return c * sum(inputs.values()) + adapter * r * len(counts.lora_modules)


def activation_bytes(s: Setting, counts: ParamCounts) -> dict[str, float]:
    """Saved-for-backward bytes of one micro-batch, and its peak with the configured checkpointing."""
    h, layers, _, _, _, _ = shapes(s.model)
    c = BYTES[s.train.precision]
    tokens = (s.train.micro_batch_size or 1) * s.row_len
    fam = family_of(s.model)
    frozen = s.method.low_rank  # frozen embeddings, final norm and head: less to keep
    outside = 0 if frozen else 8 * (2 if fam.learned_positions else 1)  # token (and position) ids
    if fam.layer_norm:  # final norm: input and statistics, and the head's input
        outside += c * h + 8 + (0 if frozen else c * h)
    else:
        outside += 4 * h + 4 + (0 if frozen else 2 * c * h)
    mode = s.train.checkpointing
    per_block = {m: block_saved_bytes(s, counts, m) * tokens for m in ("none", "selective", "full")}
    saved = layers * per_block[mode] + outside * tokens
    # one block's activations, rebuilt in its backward (selective: what it did not keep)
    recompute = {"none": 0.0, "full": per_block["none"], "selective": max(0.0, per_block["none"] - per_block["selective"])}[mode]
    mask = tokens * s.row_len * c if attention_kind(s) == "eager" else 0.0  # dense [B, 1, S, S]
    return {"saved": saved, "peak": saved + recompute, "mask": mask, **{f"block_{m}": v for m, v in per_block.items()}}


def logits_bytes(s: Setting) -> float:
    """The loss's peak beyond the head's input: plain = full logits, chunked = one block at a time."""
    h, _, _, vocab, _, _ = shapes(s.model)
    tokens = (s.train.micro_batch_size or 1) * s.row_len
    match loss_kind(s):
        case "plain":
            # backward of log-softmax: its saved fp32 output, the incoming gradient and the result
            # (the forward's compute-dtype logits + fp32 copy + output is at most as large)
            return 12.0 * tokens * vocab
        case "chunked":
            block = min(tokens, TOKEN_CHUNK) * VOCAB_CHUNK
            # logsumexp per token, fp32 hidden gradient, an fp32 weight-gradient chunk, logits/grad blocks
            return 4.0 * tokens + 4.0 * tokens * h + 4.0 * VOCAB_CHUNK * h + 3 * 4.0 * block
    return 0.0


def block_shapes(s: Setting) -> list[tuple[int, int]]:
    return [(i, o) for pairs in block_linears(s.model).values() for i, o, _ in pairs]


def estimate_memory(s: Setting) -> dict[str, float]:
    """Bytes per GPU by item (and the offloaded host bytes per node), plus `total`."""
    assert s.parallel.backend != "auto", "plan/backend.py resolve_backend() first"
    counts = count_params(s.model, s.method, s.task, s.positions)
    trainable = float(trainable_params(counts, s.model, s.method))
    out = state_bytes(s, counts, trainable)
    match s.parallel.backend:
        case "fsdp":
            fsdp_buffers(s, counts, trainable, out)
        case "deepspeed":
            deepspeed_buffers(s, counts, trainable, out)
        case _ if s.train.precision != "fp32" and s.method.name in ("full", "freeze"):
            out["gathered"] = counts.linear * BYTES[s.train.precision]  # autocast's compute-dtype weight copies, saved for backward
        case _ if s.method.name == "qlora":
            out["gathered"] = max(i * o for i, o in block_shapes(s)) * BYTES[s.train.precision]  # one linear dequantised at a time
    act = activation_bytes(s, counts)
    out["activations"] = act["peak"]
    out["logits"] = logits_bytes(s)
    out["attention_mask"] = act["mask"]
    out["context"] = CONTEXT_BYTES if s.cuda else 0.0
    device = sum(out[k] for k in DEVICE_ITEMS if k not in ("fragmentation", "context"))
    out["fragmentation"] = FRAGMENTATION * device if s.cuda else 0.0
    out["total"] = sum(out[k] for k in DEVICE_ITEMS)
    out.update({f"activations_{k}": v for k, v in act.items() if k != "peak"})
    out["params"], out["trainable_params"] = float(counts.total), trainable
    if counts.idle_layer_linear:
        out["active_params"] = float(counts.active)  # MoE: what one token's forward uses
    return out


def state_bytes(s: Setting, counts: ParamCounts, trainable: float) -> dict[str, float]:
    """Parameters, 4-bit base, gradients, AdamW states and masters held per rank."""
    c, store = BYTES[s.train.precision], BYTES[s.model.dtype]
    par, method = s.parallel, s.method.name
    group = shard_group(s)
    adapter = s.method.peft
    out = dict.fromkeys(("parameters", "quantized_base", "gradients", "optimizer", "master_weights", "gathered", "host_offloaded"), 0.0)
    stage = {"fsdp": 3, "ddp": 0, "single": 0}.get(par.backend, par.zero_stage)
    quantised = counts.linear if method == "qlora" else 0
    if method == "qlora":
        # the packed weights are sharded; each module's quantisation state (absmax, code tables) is not
        modules = counts.layers * len(block_shapes(s))
        out["quantized_base"] = quantised * NF4_PACKED / group + quantised * NF4_STATE + modules * NF4_TABLES
    weight = store if adapter else (c if par.backend == "deepspeed" else 4)  # DeepSpeed casts the module to the compute dtype
    adapters = trainable * (c if par.backend == "deepspeed" else 4) if adapter else 0.0  # peft's adapters are fp32
    out["parameters"] = ((counts.total - quantised) * weight + adapters) / (group if stage >= 3 else 1)
    if par.backend == "deepspeed" and (stage >= 1 or s.train.precision != "fp32"):
        out["master_weights"] = trainable * 4 / (group if stage >= 1 else 1)  # ZeRO copies its fp32 partition even in fp32
    grad_bytes = c if par.backend == "deepspeed" else 4
    # DDP's too, once: the runtime's buckets are views of the gradients (gradient_as_bucket_view=True)
    out["gradients"] = trainable * grad_bytes / (group if stage >= 2 else 1)
    out["optimizer"] = trainable * 8 / (group if stage >= 1 else 1)
    return out


def fsdp_buffers(s: Setting, counts: ParamCounts, trainable: float, out: dict[str, float]) -> None:
    """FSDP2: gathered units and reduce buffers; deferred sync; CPU offload."""
    c, method, fsdp = BYTES[s.train.precision], s.method.name, s.parallel.fsdp
    adapter = s.method.peft
    layer: float = counts.per_layer * c
    if method == "qlora":
        layer = counts.layer_linear * NF4_PACKED + (counts.per_layer - counts.layer_linear) * c
    layer += (trainable / max(counts.layers, 1)) * c if adapter else 0
    held = 2 if fsdp.reshard_after_forward else counts.layers
    head = counts.head or counts.embeddings  # the head's weight (the embedding when tied)
    root_trainable = head if method in ("full", "freeze") else 0
    layer_trainable = counts.per_layer if method == "full" else trainable / max(counts.layers, 1)
    reduce = BYTES[fsdp.reduce_dtype]
    # two blocks + the root gathered; the head's unsharded gradient lives through backward, and one
    # block's unsharded gradient is cast to the reduce dtype for its reduce-scatter
    out["gathered"] = held * layer + counts.root * c + root_trainable * c + layer_trainable * (c + reduce)
    if fsdp.defer_grad_sync:
        # unsharded accumulators across the whole window; the window's last backward turns each
        # unit's into its shard as it goes, so the sharded gradients never add to them
        out["gradients"] = trainable * reduce
    if fsdp.cpu_offload:
        # CPUOffloadPolicy keeps every sharded parameter on the host, QLoRA's packed 4-bit data too;
        # each module's quant state stays on the GPU, where the kernels read it (runtime/model/qlora.py)
        packed = counts.linear * NF4_PACKED / shard_group(s) if method == "qlora" else 0.0
        out["host_offloaded"] = (out["parameters"] + packed + out["gradients"] + out["optimizer"]) * s.topology.procs_per_node
        out["quantized_base"] -= packed
        out["parameters"] = out["gradients"] = out["optimizer"] = 0.0


def deepspeed_buffers(s: Setting, counts: ParamCounts, trainable: float, out: dict[str, float]) -> None:
    """ZeRO: gathered parameters (stage 3) and buckets; optimizer / parameter offload to the host."""
    c, par = BYTES[s.train.precision], s.parallel
    bucket = (s.model.hidden_size or 0) ** 2 * c
    if par.zero_stage >= 3:
        layer = counts.per_layer * c
        out["gathered"] = layer + max(layer, counts.head * c) + 2 * bucket  # live blocks, prefetch, reduce buckets
    else:
        out["gathered"] = 3 * bucket
    if par.zero_stage == 2:
        # one bucket's gradients wait unreduced between micro-batches on the rank that owns them; a
        # tensor larger than the bucket (the embedding, the head) goes as a bucket of its own
        largest = max([(s.model.vocab_size or 0) * (s.model.hidden_size or 0), *(i * o for i, o in block_shapes(s))])
        out["gradients"] += max(bucket, largest * c)
    ranks = s.topology.procs_per_node
    if par.offload_optimizer != "none":
        fp32_grads = trainable * 4 / shard_group(s)
        out["host_offloaded"] = (out["master_weights"] + out["optimizer"] + fp32_grads) * ranks
        out["master_weights"] = out["optimizer"] = 0.0
        if par.zero_stage >= 2:
            out["gradients"] = 0.0  # reduced straight into the host fp32 partition
    if par.offload_params != "none" and par.zero_stage >= 3:
        out["host_offloaded"] += out["parameters"] * ranks
        out["parameters"] = 0.0


DEVICE_ITEMS = (
    "parameters",
    "quantized_base",
    "gradients",
    "optimizer",
    "master_weights",
    "gathered",
    "activations",
    "logits",
    "attention_mask",
    "context",
    "fragmentation",
)
