"""The recipe schema: frozen dataclasses, one per section.

YAML is data merged into these classes with OmegaConf, so a wrong key or type fails at load with its
path. Cross-field rules live in `validate.py`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# auto: the plan picks ddp when the whole training state fits on each device with margin, else fsdp
# (plan/backend.py); the ranks only ever see the concrete backend.
Backend = Literal["auto", "fsdp", "deepspeed", "ddp", "single"]
MethodName = Literal["full", "lora", "qlora", "freeze", "prompt_tuning"]
PEFT_METHODS = ("lora", "qlora", "prompt_tuning")  # peft wraps the model; only its adapters train
LORA_METHODS = ("lora", "qlora")  # low-rank adapters on a frozen base: mergeable, and the base is the reference
Precision = Literal["bf16", "fp16", "fp32"]
DType = Literal["bfloat16", "float16", "float32"]
Offload = Literal["none", "cpu", "nvme"]
Accelerator = Literal["cuda", "cpu"]
Attention = Literal["auto", "flash", "sdpa", "eager"]
Template = Literal["instruction", "alpaca", "chat", "text"]
DataFormat = Literal["auto", "json", "jsonl", "parquet", "csv", "saved", "hub"]
Scheduler = Literal["cosine", "linear", "constant"]
Task = Literal["causal_lm", "classification", "preference"]
PreferenceLoss = Literal["dpo", "ipo", "orpo", "simpo"]
Strategy = Literal["steps", "epoch"]
# train.activation_checkpointing: false | true (= full) | full | selective (op-level, matmul outputs kept)
Checkpointing = bool | Literal["full", "selective"]
# train.report_to: experiment trackers, each an extra (`pip install 'launcher[wandb]'`); the import
# name of each is probed at plan time (validate.py) and imported on rank 0 only (runtime/train/trackers.py).
Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
Gpu = Literal["", "h100-80gb", "h200", "a100-80gb", "a100-40gb", "l40s", "a10g", "l4"]
# Usable memory per GPU in GiB (what the CUDA allocator can get), for cluster.gpu.
GPU_MEMORY_GIB = {"h100-80gb": 80.0, "h200": 140.0, "a100-80gb": 80.0, "a100-40gb": 40.0, "l40s": 45.0, "a10g": 22.5, "l4": 22.5}
# The GRES type most sites give each cluster.gpu (sbatch --gpus-per-node=TYPE:N); cluster.gpu_type overrides it.
GRES_TYPES = {"h100-80gb": "h100", "h200": "h200", "a100-80gb": "a100", "a100-40gb": "a100", "l40s": "l40s", "a10g": "a10g", "l4": "l4"}
# cluster.network: the transport NCCL uses between nodes (plan/network.py sets its variables).
Network = Literal["auto", "ib", "efa", "socket"]
# cluster.numa_binding: torchrun's --numa-binding modes (torch.numa.binding.AffinityMode).
NumaBinding = Literal["none", "node", "socket", "exclusive", "core-complex"]


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    output_dir: str = ""  # empty: runs/<run.name>, relative to the working directory
    seed: int = 1234


@dataclass(frozen=True)
class ModelSection:
    # A local Hugging Face model directory, a Hub id, or "tiny-llama" (built offline in CPU mode).
    name_or_path: str = "tiny-llama"
    dtype: DType = "bfloat16"  # storage dtype of the loaded weights
    trust_remote_code: bool = False
    # Architecture numbers used by the planner (bucket sizes, memory estimate). Read from the
    # model's config.json (a local directory, or a Hub id already in the local HF cache) through
    # transformers' attribute map (config/arch.py); give them by hand only for a model not on disk.
    hidden_size: int | None = None
    num_layers: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    head_dim: int | None = None  # attention head width when not hidden_size / heads (Gemma)
    # Gemma-2's attn_logit_softcapping, from config.json: SDPA cannot apply it, so kernels.attention
    # auto picks flash (CUDA, flash-attn) or eager for such a model, and sdpa is refused at plan time.
    attn_logit_softcapping: float | None = None
    # Mixture-of-Experts layers (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek), from config.json: experts per
    # layer, experts each token is routed to, each expert's MLP width (intermediate_size when the
    # config has no moe_intermediate_size) and a shared expert's (Qwen2-MoE). None: a dense model.
    num_experts: int | None = None
    experts_per_token: int | None = None
    expert_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    architecture: str = ""  # the config's model_type (llama, gpt2, bert, ...); filled in from config.json
    # The repeated block FSDP2 shards one unit per instance of (and activation checkpointing wraps).
    # Empty: found from the model (`_no_split_modules`, the repeated block list); set only to override.
    layer_class: str = ""
    # Filled by the plan for a Hub id already in the local HF cache: its snapshot directory, which the
    # ranks load from (they never ask the Hub which revision is current).
    local_dir: str = ""


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" or a list of module names, e.g. [q_proj, v_proj].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass(frozen=True)
class QuantSection:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "bfloat16"
    # The dtype 4-bit weights are stored in. FSDP and ZeRO-3 flatten parameters together, so it
    # must equal the dtype of the unquantised parameters (see validate.py).
    quant_storage_dtype: DType = "bfloat16"


@dataclass(frozen=True)
class FreezeSection:
    trainable_last_layers: int = 2  # decoder layers left trainable, counted from the top
    train_head: bool = True  # lm_head (and the final norm)
    train_embeddings: bool = False


@dataclass(frozen=True)
class PromptTuningSection:
    num_virtual_tokens: int = 16


@dataclass(frozen=True)
class MethodSection:
    name: MethodName = "full"
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    prompt_tuning: PromptTuningSection = field(default_factory=PromptTuningSection)

    @property
    def peft(self) -> bool:
        return self.name in PEFT_METHODS

    @property
    def low_rank(self) -> bool:
        return self.name in LORA_METHODS


@dataclass(frozen=True)
class SourceSection:
    """One data set of a mix (`data.datasets`); empty values inherit from the data section."""

    path: str = ""  # a file, a save_to_disk directory, a Hub id, or tiny-tasks
    name: str = ""  # the name in the cleaning report; empty: the file or folder name
    format: DataFormat = "auto"
    split: str = ""  # empty: data.split
    template: Template | None = None  # None: data.template
    columns: dict[str, str] = field(default_factory=dict)  # role -> column, over data.columns
    weight: float = 1.0  # share of the mix, relative to the other sets' weights
    samples: int = 0  # documents per epoch from this set (repeated or subsampled); 0: by weight


@dataclass(frozen=True)
class DataSection:
    # A local file (json, jsonl, parquet, csv), a directory saved with `save_to_disk`, a Hub id,
    # or "tiny-tasks" (the shipped synthetic task set).
    path: str = "tiny-tasks"
    format: DataFormat = "auto"
    split: str = "train"
    val_path: str = ""  # a separate validation source (its split: val_split, or its only one)
    val_split: str = ""  # a split of `path` (a DatasetDict or Hub split), e.g. validation
    val_fraction: float = 0.02  # used when neither val_path nor val_split is given
    # instruction: prompt + response; alpaca: instruction + optional input + output (the Stanford
    # Alpaca prompt); chat: OpenAI `messages` or ShareGPT `conversations`; text: plain text.
    template: Template = "instruction"
    # Role -> column of the user's data, e.g. {instruction: question, output: answer}. Roles:
    # prompt, response, instruction, input, output, system, messages, text, label; task: preference
    # reads prompt, chosen and rejected (text, or lists of chat messages).
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: str = ""  # a Jinja file or an inline template; empty: the tokenizer's own
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    label_field: str = "label"  # task: classification; the class of each row (a string or an integer)
    train_on_prompt: bool = False  # False: prompt tokens get label -100
    max_seq_len: int = 2048
    packing: bool = True
    dedup: bool = True
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    drop_longer: bool = True  # False: truncate over-long examples instead
    num_proc: int = 1  # processes tokenising (datasets.map)
    cache_dir: str = ""  # empty: <project cache>/data
    max_dropped_fraction: float = 0.5  # more rows of a data set dropped than this: an error
    # Several data sets mixed into one run (each with its own source, template and columns);
    # empty: the one data set above (data.path).
    datasets: list[SourceSection] = field(default_factory=list)


@dataclass(frozen=True)
class PreferenceSection:
    """task: preference. The losses and their settings mean what TRL's do (DPOTrainer for dpo and ipo,
    CPOTrainer's simpo, ORPOTrainer's orpo); dpo and ipo need the reference model's log-probabilities,
    orpo and simpo do not."""

    loss: PreferenceLoss = "dpo"
    beta: float = 0.1  # dpo/ipo: the KL strength (IPO's tau); simpo: the reward scale
    label_smoothing: float = 0.0  # dpo/simpo: the probability a pair's preference is flipped (cDPO), in [0, 0.5)
    gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    orpo_lambda: float = 0.1  # orpo: the weight of the odds-ratio term (TRL's ORPOConfig.beta; `lambda` is Python's)

    @property
    def needs_reference(self) -> bool:
        """dpo and ipo score against the reference model's log-probabilities; orpo and simpo are reference-free."""
        return self.loss in ("dpo", "ipo")


@dataclass(frozen=True)
class OptimSection:
    name: Literal["adamw"] = "adamw"
    lr: float = 2.0e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    scheduler: Scheduler = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of the run's steps (like the HF Trainer); exclusive with warmup_steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class EarlyStoppingSection:
    metric: str = ""  # an evaluation metric (val_loss, accuracy, f1, ...); empty: no early stopping
    mode: Literal["min", "max"] = "min"
    patience: int = 3  # evaluations without improvement before the run stops
    threshold: float = 0.0  # the smallest change that counts as an improvement


@dataclass(frozen=True)
class TrainSection:
    micro_batch_size: int | None = None  # sequences per rank per forward
    # Let the plan pick micro_batch_size: the largest power of two that divides global_batch_size /
    # data-parallel and whose estimate stays within 90 % of the GPU's memory (cluster.gpu_memory_gib);
    # accumulation follows from the global batch. A separate switch, so micro_batch_size stays an int.
    auto_micro_batch: bool = False
    gradient_accumulation_steps: int | None = None
    global_batch_size: int | None = None  # sequences per optimizer step, all ranks
    max_steps: int | None = None  # optimizer steps; default 1000 unless train.epochs is set
    epochs: float | None = None  # passes over the training rows (exclusive with max_steps)
    precision: Precision = "bf16"
    activation_checkpointing: Checkpointing = False
    compile: bool = False  # torch.compile each repeated block (after checkpointing, before FSDP2 sharding)
    plot: bool = True  # loss.png (loss and learning rate), drawn by `launcher run` after the ranks exit
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_strategy: Strategy = "steps"  # epoch: evaluate at the end of every epoch (eval_every ignored)
    eval_batches: int = 8
    eval_exact_match: int = 0  # held-out prompts greedily decoded at each eval (0: none)
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    report_to: list[Tracker] = field(default_factory=list)  # fed the records of metrics.jsonl, e.g. [tensorboard]

    @property
    def checkpointing(self) -> Literal["none", "full", "selective"]:
        """activation_checkpointing as one of three modes (`true` is full, for older recipes)."""
        value = self.activation_checkpointing
        return "full" if value is True else "none" if value is False else value


@dataclass(frozen=True)
class FsdpSection:
    reshard_after_forward: bool = True
    hsdp: bool = False  # shard within a node, replicate across nodes
    reduce_dtype: DType = "float32"
    cpu_offload: bool = False
    # Keep gradients unsharded across an accumulation window and reduce-scatter once at its end:
    # fewer collectives, but every parameter's fp32 gradient in full on every GPU until then.
    defer_grad_sync: bool = False


@dataclass(frozen=True)
class ParallelSection:
    backend: Backend = "auto"
    zero_stage: int = 3
    offload_optimizer: Offload = "none"
    offload_params: Offload = "none"
    nvme_path: str = ""
    fsdp: FsdpSection = field(default_factory=FsdpSection)


@dataclass(frozen=True)
class KernelsSection:
    attention: Attention = "auto"
    # LM head + cross-entropy: auto = Liger's fused kernel on CUDA when installed, else our chunked
    # one (full logits never exist); plain = full logits (models that post-process logits get it).
    loss: Literal["auto", "liger", "chunked", "plain"] = "auto"
    liger: bool = False  # Liger's RMSNorm / SwiGLU / RoPE kernels (CUDA, pip install launcher[liger])


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 0  # steps between saves (0: only at the end)
    save_strategy: Strategy = "steps"  # epoch: save at the end of every epoch (every ignored)
    keep_last: int = 2
    resume: str = "auto"  # auto | never | a checkpoint directory
    async_save: bool = False
    allow_mismatch: bool = False  # warn instead of fail when data or batch settings changed


@dataclass(frozen=True)
class ClusterSection:
    accelerator: Accelerator = "cuda"
    # The GPU's memory, for the plan's check (warn above 90 %, refuse above 100 % of the estimate):
    # gpu_memory_gib in GiB, or a known gpu name that implies it (and the peak FLOPs for step time).
    # cluster.gpu given on the command line replaces the recipe's gpu_memory_gib (config/load.py: a
    # recipe's 80 run with gpu=h200 is checked against 140, with gpu=l4 against 22.5); both given,
    # the smaller wins (a MIG slice, memory kept back). cluster.gpu also asks
    # sbatch for that GPU type: --gpus-per-node=TYPE:N with TYPE from GRES_TYPES or cluster.gpu_type.
    gpu: Gpu = ""
    gpu_memory_gib: float | None = None
    # The GRES type name the site gives that GPU (`scontrol show node` lists them, e.g.
    # nvidia_h100_80gb_hbm3); empty: GRES_TYPES[cluster.gpu]; none: no type in the request.
    gpu_type: str = ""
    nodes: int = 1
    gpus_per_node: int = 8  # processes per node (on CPU: worker processes)
    world_size: int | None = None  # optional cross-check of nodes x gpus_per_node
    # SLURM
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time: str = "04:00:00"
    cpus_per_task: int = 8  # CPUs per node task (the task runs torchrun and its workers)
    mem: str = ""  # e.g. 0 (whole node) or 480G; empty: cluster default
    signal_seconds: int = 300  # USR1 this long before the time limit: save, then requeue
    # Write speed to the run directory per node, in GB/s (gigabytes); the plan warns when
    # signal_seconds cannot cover a save at that speed. None: 2 GB/s is assumed.
    fs_bandwidth_gbps: float | None = None
    # What the shared file system takes from all nodes together, in GB/s: a save from many nodes is
    # capped by it (None: 20 GB/s is assumed).
    fs_total_gbps: float | None = None
    # How long every process group waits on one collective before it aborts the job (NCCL's default
    # is 10 min). A healthy job's longest wait is the other ranks at a barrier while a checkpoint is
    # written: None derives it from the save estimate (plan/budget.py), at least 600; plan.json
    # carries the value the ranks use.
    collective_timeout_seconds: int | None = None
    requeue: bool = True
    max_requeues: int = 3
    max_failure_requeues: int = 2  # requeues after a crash that left a newer complete checkpoint
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--exclusive"]
    env: dict[str, str] = field(default_factory=dict)  # exported in launch.sh and job.sbatch
    # The network between nodes, exported in GPU jobs (a CPU job has no NCCL: none of this):
    # auto: NCCL's own choice; ib: InfiniBand/RoCE verbs (NCCL_IB_DISABLE=0, NCCL_IB_HCA=ib_hca);
    # efa: AWS EFA through aws-ofi-nccl (FI_PROVIDER=efa, GPUDirect RDMA where cluster.gpu has it);
    # socket: TCP only (NCCL_IB_DISABLE=1). cluster.env overrides any of them.
    network: Network = "auto"
    ib_hca: str = ""  # network ib: NCCL_IB_HCA, e.g. mlx5_0,mlx5_1 or ^mlx5_4 or =mlx5_0:1; empty: NCCL's choice
    socket_ifname: str = ""  # NCCL_SOCKET_IFNAME, e.g. eth0, ens or ^docker,lo; empty: NCCL's choice
    # torchrun
    max_restarts: int = 0
    rdzv_port: int | None = None  # None: derived from the SLURM job id (multi-node)
    # Each GPU rank's CPUs and memory near its GPU (torchrun --numa-binding, which runs each rank
    # under numactl: it must be on the nodes). node is torch's advice; none: no binding.
    numa_binding: NumaBinding = "none"


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    task: Task = "causal_lm"
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
