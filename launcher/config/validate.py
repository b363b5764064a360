"""Every rule a recipe must satisfy beyond its types, in one place.

`check_fields` looks at single values (ranges, formats) and runs before derived values are filled
in; `check_combinations` looks at how sections fit together, including the compatibility table
(QLoRA x FSDP/ZeRO-3, offload x stage, packing x attention, fp16 x CPU, ...). Each problem is one
line naming the key and the fix; all problems are reported together.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Iterator
from typing import Any

from launcher.config.arch import ENCODERS
from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import TRACKER_MODULES, DataSection, RunConfig
from launcher.config.values import check_run_dir, control_problem, numbers

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SLURM_WORD = re.compile(r"^[A-Za-z0-9._-]*$")
SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9._&|,\[\]*:!()-]*$")
SLURM_TIME = re.compile(r"^\d+-\d{1,2}(:\d{2}){0,2}$|^\d+(:\d{2}){0,2}$")
SLURM_MEM = re.compile(r"^(\d+[KMGT]?)?$")
SBATCH_OPTION = re.compile(r"^--[a-z][a-z0-9-]*(=[^\s\"'\\`$;]+)?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# NCCL_IB_HCA / NCCL_SOCKET_IFNAME: an optional ^ (all but) and = (exact names), then names (HCA:port) by commas
NCCL_DEVICES = re.compile(r"^\^?=?[A-Za-z0-9_.@-]+(:\d+)?(,[A-Za-z0-9_.@-]+(:\d+)?)*$")

# train.precision -> the dtype FSDP2 gathers parameters in (plan/fsdp.py's mixed_precision.param_dtype), and back
_PARAM_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_PRECISION = {dtype: precision for precision, dtype in _PARAM_DTYPE.items()}


def validate(cfg: RunConfig, explicit: set[str] | None = None) -> None:
    """Raise ConfigError with every problem found; `explicit` is the set of keys the user set."""
    problems = list(check_fields(cfg)) + list(check_combinations(cfg, explicit or set()))
    if problems:
        raise ConfigError(problems)


def check_fields(cfg: RunConfig) -> Iterator[Problem]:
    for path, value in _strings(cfg, ""):
        problem = control_problem(path, value, allowed="\n\t" if path.startswith("cluster.env.") else "")
        if problem is not None:
            yield problem
    yield from numbers(cfg)
    if not NAME.match(cfg.run.name):
        yield Problem("run.name", f"{cfg.run.name!r} is not a plain name", "use letters, digits, '.', '_' and '-' (up to 128)")
    if not control_problem("", cfg.run.output_dir):
        yield from check_run_dir(cfg.run.output_dir, "run.output_dir")
    if -(2**63) <= cfg.run.seed < 0:  # above 2**63 - 1: reported by numbers()
        yield Problem("run.seed", f"{cfg.run.seed} is negative", "use e.g. 1234 (0 to 2**63 - 1)")
    if not cfg.model.name_or_path.strip():
        yield Problem("model.name_or_path", "is empty", "give a local model directory, a Hub id or tiny-llama")
    if cfg.model.layer_class and not MODULE_NAME.match(cfg.model.layer_class):
        yield Problem("model.layer_class", f"{cfg.model.layer_class!r} is not a class name", "e.g. LlamaDecoderLayer")

    lora = cfg.method.lora
    yield from _at_least(lora.r, 1, "method.lora.r")
    if lora.alpha <= 0:
        yield Problem("method.lora.alpha", f"{lora.alpha} is not positive", "use e.g. 2 x method.lora.r")
    yield from _fraction(lora.dropout, "method.lora.dropout", upper_open=True)
    if not lora.target_modules:
        yield Problem("method.lora.target_modules", "is empty", "use [all-linear] or module names like [q_proj, v_proj]")
    for name in lora.target_modules:
        if name != "all-linear" and not MODULE_NAME.match(name):
            yield Problem("method.lora.target_modules", f"{name!r} is not a module name", "use names like q_proj")
    yield from _at_least(cfg.method.freeze.trainable_last_layers, 0, "method.freeze.trainable_last_layers")
    yield from _at_least(cfg.method.prompt_tuning.num_virtual_tokens, 1, "method.prompt_tuning.num_virtual_tokens")

    data = cfg.data
    if not data.path.strip():
        yield Problem("data.path", "is empty", "give a data file, a saved dataset directory, a Hub id or tiny-tasks")
    yield from _fraction(data.val_fraction, "data.val_fraction", upper_open=True)
    yield from _at_least(data.max_seq_len, 16, "data.max_seq_len")
    yield from _at_least(data.num_proc, 1, "data.num_proc")
    for key in ("prompt_field", "response_field", "messages_field", "text_field", "split"):
        if not getattr(data, key):
            yield Problem(f"data.{key}", "is empty", "name a column of the data")
    yield from check_data_sources(cfg)

    optim = cfg.optim
    if not 0 < optim.lr < 1:
        yield Problem("optim.lr", f"{optim.lr} is outside (0, 1)", "use e.g. 2e-5 for full fine-tuning, 2e-4 for LoRA")
    yield from _at_least(optim.weight_decay, 0, "optim.weight_decay")
    yield from _fraction(optim.beta1, "optim.beta1", upper_open=True)
    yield from _fraction(optim.beta2, "optim.beta2", upper_open=True)
    if optim.eps <= 0:
        yield Problem("optim.eps", f"{optim.eps} is not positive", "use e.g. 1e-8")
    yield from _at_least(optim.warmup_steps, 0, "optim.warmup_steps")
    yield from _fraction(optim.min_lr_ratio, "optim.min_lr_ratio", upper_open=False)
    yield from _at_least(optim.max_grad_norm, 0, "optim.max_grad_norm")

    train = cfg.train
    for key in ("micro_batch_size", "gradient_accumulation_steps", "global_batch_size"):
        if getattr(train, key) is not None:
            yield from _at_least(getattr(train, key), 1, f"train.{key}")
    if train.max_steps is not None:
        yield from _at_least(train.max_steps, 1, "train.max_steps")
    yield from _memory_fields(cfg)
    if train.epochs is not None and not train.epochs > 0:
        yield Problem("train.epochs", f"{train.epochs} is not positive", "use e.g. 3, or set train.max_steps instead")
    yield from _fraction(cfg.optim.warmup_ratio, "optim.warmup_ratio", upper_open=True)
    yield from _at_least(train.early_stopping.patience, 1, "train.early_stopping.patience")
    yield from _at_least(train.early_stopping.threshold, 0, "train.early_stopping.threshold")
    yield from _at_least(train.log_every, 1, "train.log_every")
    yield from _at_least(train.eval_every, 0, "train.eval_every")
    yield from _at_least(train.eval_batches, 0, "train.eval_batches")
    yield from _at_least(train.eval_exact_match, 0, "train.eval_exact_match")
    for i, name in enumerate(train.report_to):
        if name in train.report_to[:i]:
            yield Problem("train.report_to", f"lists {name} twice", "list each tracker once")
        elif not _importable(TRACKER_MODULES[name]):  # found, not imported: planning stays instant
            yield Problem(
                "train.report_to", f"{name} is not installed", f"pip install 'launcher[{name}]', or remove it from train.report_to"
            )

    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        yield Problem("parallel.zero_stage", f"{cfg.parallel.zero_stage} is not one of 0, 1, 2, 3", "pick a ZeRO stage 0-3")

    ckpt = cfg.checkpoint
    yield from _at_least(ckpt.every, 0, "checkpoint.every")
    yield from _at_least(ckpt.keep_last, 1, "checkpoint.keep_last")
    if not ckpt.resume.strip():
        yield Problem("checkpoint.resume", "is empty", "use auto, never or a checkpoint directory")

    cluster = cfg.cluster
    yield from _at_least(cluster.nodes, 1, "cluster.nodes")
    yield from _at_least(cluster.gpus_per_node, 1, "cluster.gpus_per_node")
    yield from _at_least(cluster.cpus_per_task, 1, "cluster.cpus_per_task")
    yield from _at_least(cluster.max_requeues, 0, "cluster.max_requeues")
    yield from _at_least(cluster.max_failure_requeues, 0, "cluster.max_failure_requeues")
    if cluster.fs_total_gbps is not None and not 0 < cluster.fs_total_gbps <= 100_000:
        yield Problem("cluster.fs_total_gbps", f"{cluster.fs_total_gbps} is not a write speed in GB/s", "use e.g. 20, or leave it out")
    if cluster.fs_bandwidth_gbps is not None and not 0 < cluster.fs_bandwidth_gbps <= 10_000:
        yield Problem(
            "cluster.fs_bandwidth_gbps", f"{cluster.fs_bandwidth_gbps} is not a write speed in GB/s", "use e.g. 2, or leave it out"
        )
    yield from _at_least(cluster.max_restarts, 0, "cluster.max_restarts")
    if cluster.collective_timeout_seconds is not None and not 60 <= cluster.collective_timeout_seconds <= 7 * 86400:
        yield Problem(
            "cluster.collective_timeout_seconds",
            f"{cluster.collective_timeout_seconds} is outside 60-604800",
            "use e.g. 1800, or leave it out (derived from the save estimate)",
        )
    if not 0 <= cluster.signal_seconds <= 65535:
        yield Problem("cluster.signal_seconds", f"{cluster.signal_seconds} is outside 0-65535", "use e.g. 300 (0 disables)")
    if cluster.rdzv_port is not None and not 1024 <= cluster.rdzv_port <= 65535:
        yield Problem("cluster.rdzv_port", f"{cluster.rdzv_port} is outside 1024-65535", "pick a free port, or leave it out")
    for key in ("partition", "account", "qos", "gpu_type"):
        if not SLURM_WORD.match(getattr(cluster, key)):
            yield Problem(f"cluster.{key}", f"{getattr(cluster, key)!r} is not a SLURM name", "use letters, digits, '.', '_', '-'")
    if not SLURM_CONSTRAINT.match(cluster.constraint):
        yield Problem("cluster.constraint", f"{cluster.constraint!r} has characters SLURM features cannot", "e.g. a100&ib")
    if not SLURM_TIME.match(cluster.time):
        yield Problem("cluster.time", f"{cluster.time!r} is not a SLURM time", "use minutes, HH:MM:SS or D-HH:MM:SS")
    if not SLURM_MEM.match(cluster.mem):
        yield Problem("cluster.mem", f"{cluster.mem!r} is not a SLURM memory size", "use e.g. 0, 480G or 512000M")
    for line in cluster.extra_sbatch:
        if not SBATCH_OPTION.match(line):
            yield Problem(
                "cluster.extra_sbatch", f"{line!r} is not one sbatch option", "write e.g. --exclusive or --gres-flags=enforce-binding"
            )
    for name in cluster.env:
        if not ENV_NAME.match(name):
            yield Problem(f"cluster.env.{name}", "is not an environment variable name", "use letters, digits and '_'")
    for key, example in (("ib_hca", "mlx5_0,mlx5_1 or ^mlx5_4"), ("socket_ifname", "eth0 or ^docker,lo")):
        if getattr(cluster, key) and not NCCL_DEVICES.match(getattr(cluster, key)):
            yield Problem(f"cluster.{key}", f"{getattr(cluster, key)!r} is not a list NCCL reads", f"use e.g. {example}")
    if cluster.ib_hca and cluster.network != "ib":
        yield Problem(
            "cluster.ib_hca",
            f"is read only with cluster.network: ib (it is {cluster.network})",
            "set cluster.network: ib, or leave ib_hca out",
        )


DATA_ROLES = ("prompt", "response", "instruction", "input", "output", "system", "messages", "text", "label", "chosen", "rejected")


def check_data_sources(cfg: RunConfig) -> Iterator[Problem]:
    """data.columns, data.datasets, the validation split and the dropped-rows limit."""
    data = cfg.data
    yield from _fraction(data.max_dropped_fraction, "data.max_dropped_fraction", upper_open=False)
    if data.val_split and data.val_split == data.split and not data.val_path:
        yield Problem(
            "data.val_split", f"is data.split ({data.split}): validation would be the training rows", "name another split, e.g. validation"
        )
    mappings = [("data.columns", data.columns)] + [(f"data.datasets[{i}].columns", d.columns) for i, d in enumerate(data.datasets)]
    for key, columns in mappings:
        for role, column in columns.items():
            if role not in DATA_ROLES:
                yield Problem(f"{key}.{role}", "is not a role", f"use one of {', '.join(DATA_ROLES)}")
            elif not isinstance(column, str) or not column:  # OmegaConf leaves values inside list items unchecked
                yield Problem(f"{key}.{role}", "is not a column name", "name a column of the data, as a string")
    for i, source in enumerate(data.datasets):
        if not source.path.strip():
            yield Problem(f"data.datasets[{i}].path", "is empty", "give a data file, a saved dataset directory, a Hub id or tiny-tasks")
        if source.weight <= 0:
            yield Problem(f"data.datasets[{i}].weight", f"{source.weight} is not positive", "give a share like 1 or 3")
        if source.samples < 0:
            yield Problem(f"data.datasets[{i}].samples", f"{source.samples} is negative", "give a document count, or 0 to mix by weight")
    templates = {d.template or data.template for d in data.datasets} if data.datasets else {data.template}
    if data.chat_template and "chat" not in templates:
        yield Problem(
            "data.chat_template", "is set but no data set uses data.template: chat", "set data.template: chat, or remove data.chat_template"
        )


def _memory_fields(cfg: RunConfig) -> Iterator[Problem]:
    """cluster.gpu_memory_gib and train.auto_micro_batch (the plan's memory check, plan/estimate)."""
    cluster, train = cfg.cluster, cfg.train
    if cluster.gpu_memory_gib is not None and not 0 < cluster.gpu_memory_gib <= 4096:
        yield Problem("cluster.gpu_memory_gib", f"{cluster.gpu_memory_gib} is not a GPU memory size in GiB", "use e.g. 80, or leave it out")
    if not train.auto_micro_batch:
        return
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(train, key) is not None:
            fix = f"remove train.{key}, or set auto_micro_batch: false"
            yield Problem(f"train.{key}", "is set but train.auto_micro_batch picks it", fix)
    if train.global_batch_size is None:
        yield Problem("train.auto_micro_batch", "needs train.global_batch_size", "set the global batch (sequences per step)")
    if cluster.accelerator != "cuda" or (cluster.gpu_memory_gib is None and not cluster.gpu):
        yield Problem("train.auto_micro_batch", "needs the GPU's memory", "set cluster.gpu_memory_gib (e.g. 80) or cluster.gpu, on cuda")


def check_combinations(cfg: RunConfig, explicit: set[str]) -> Iterator[Problem]:
    par, train, method, cluster = cfg.parallel, cfg.train, cfg.method, cfg.cluster
    world = cluster.nodes * cluster.gpus_per_node
    cpu = cluster.accelerator == "cpu"

    if cluster.world_size is not None and cluster.world_size != world:
        yield Problem(
            "cluster.world_size",
            f"{cluster.world_size} != cluster.nodes {cluster.nodes} x cluster.gpus_per_node {cluster.gpus_per_node} = {world}",
            "fix one of the three, or leave cluster.world_size out",
        )
    if par.backend == "single" and world != 1:
        yield Problem(
            "parallel.backend", f"single runs one process but the cluster has {world}", "use fsdp, ddp or deepspeed, or 1 node x 1 gpu"
        )

    # DeepSpeed and FSDP are exclusive: a setting of the backend not chosen, changed from its
    # default, is a mistake (defaults are fine, so a written config.yaml loads again).
    defaults = RunConfig().parallel
    if par.backend != "deepspeed":
        for key in ("zero_stage", "offload_optimizer", "offload_params", "nvme_path"):
            if f"parallel.{key}" in explicit and getattr(par, key) != getattr(defaults, key):
                yield Problem(
                    f"parallel.{key}",
                    f"is a DeepSpeed setting but parallel.backend is {par.backend}",
                    "remove it, or set parallel.backend: deepspeed (FSDP offload is parallel.fsdp.cpu_offload)",
                )
    if par.backend not in ("fsdp", "auto"):  # auto: an FSDP setting makes the plan pick fsdp (plan/backend.py)
        for key in sorted(k for k in explicit if k.startswith("parallel.fsdp.")):
            name = key.rpartition(".")[2]
            if getattr(par.fsdp, name) == getattr(defaults.fsdp, name):
                continue
            yield Problem(key, f"is an FSDP setting but parallel.backend is {par.backend}", "remove it, or set parallel.backend: fsdp")
    if par.backend == "deepspeed":
        if par.offload_optimizer != "none" and par.zero_stage == 0:
            yield Problem(
                "parallel.offload_optimizer", "needs ZeRO stage 1, 2 or 3", "raise parallel.zero_stage or set offload_optimizer: none"
            )
        if par.offload_params != "none" and par.zero_stage != 3:
            yield Problem(
                "parallel.offload_params",
                f"needs ZeRO stage 3 (stage is {par.zero_stage})",
                "set parallel.zero_stage: 3 or offload_params: none",
            )
        if par.offload_optimizer == "nvme" and par.zero_stage != 3:
            yield Problem(
                "parallel.offload_optimizer",
                "nvme offload needs ZeRO stage 3 (ZeRO-Infinity)",
                "set parallel.zero_stage: 3 or offload to cpu",
            )
        if "nvme" in (par.offload_optimizer, par.offload_params) and not par.nvme_path:
            yield Problem("parallel.nvme_path", "is empty but NVMe offload is on", "set it to a fast local disk, e.g. /local_nvme")
    if par.fsdp.hsdp and cluster.nodes < 2:
        yield Problem("parallel.fsdp.hsdp", "replicates across nodes but cluster.nodes is 1", "set cluster.nodes >= 2 or hsdp: false")
    if par.fsdp.cpu_offload and cpu:
        yield Problem("parallel.fsdp.cpu_offload", "offloads to the CPU but the run is already on the CPU", "set it to false")

    if cpu and train.precision == "fp16":
        yield Problem("train.precision", "fp16 is not supported on the CPU", "use bf16 or fp32")
    elif train.precision == "fp16" and par.backend != "deepspeed":
        # Without dynamic loss scaling, fp16 gradients underflow silently; DeepSpeed scales its loss (deepspeed.json fp16 block).
        yield Problem(
            "train.precision", f"fp16 on {par.backend} runs without a gradient scaler", "use bf16, or parallel.backend: deepspeed for fp16"
        )
    if cfg.model.attn_logit_softcapping is not None and cfg.kernels.attention == "sdpa":
        yield Problem(
            "kernels.attention",
            f"sdpa cannot apply this model's attention softcapping (attn_logit_softcapping {cfg.model.attn_logit_softcapping:g} "
            "in its config.json); it would fail at the first forward",
            "use auto (flash on CUDA with flash-attn, else eager), eager or flash",
        )
    if cpu and cfg.kernels.attention == "flash":
        yield Problem("kernels.attention", "flash needs CUDA but cluster.accelerator is cpu", "use auto or sdpa")
    if cpu and cfg.kernels.loss == "liger":
        yield Problem("kernels.loss", "liger needs CUDA but cluster.accelerator is cpu", "use auto or chunked")
    if cpu and cfg.kernels.liger:
        yield Problem("kernels.liger", "Liger's kernels need CUDA but cluster.accelerator is cpu", "set kernels.liger: false")
    if par.backend == "deepspeed" and cfg.train.compile:  # blocks are compiled before sharding; DeepSpeed wraps and partitions them itself
        yield Problem("train.compile", "is not supported with DeepSpeed here", "set train.compile: false, or parallel.backend: fsdp or ddp")
    if method.name == "qlora" and cfg.train.compile:
        yield Problem("train.compile", "does not compile bitsandbytes' 4-bit layers (method qlora)", "set train.compile: false")

    if method.name == "qlora":
        quant = method.quant
        flat = par.backend == "fsdp" or (par.backend == "deepspeed" and par.zero_stage == 3)
        if flat and quant.quant_storage_dtype != cfg.model.dtype:
            yield Problem(
                "method.quant.quant_storage_dtype",
                f"{quant.quant_storage_dtype} differs from model.dtype {cfg.model.dtype}; "
                f'{par.backend} flattens parameters of one dtype ("Must flatten tensors with uniform dtype")',
                f"set method.quant.quant_storage_dtype: {cfg.model.dtype}",
            )
        elif (par.backend == "fsdp" or (par.backend == "deepspeed" and cfg.train.precision != "fp32")) and (
            quant.quant_storage_dtype != _PARAM_DTYPE[cfg.train.precision]
        ):
            # FSDP2's MixedPrecisionPolicy casts every parameter to param_dtype (train.precision) for its
            # all-gather: the packed 4-bit bytes are reinterpreted as numbers and scrambled (fp16 storage
            # under bf16 gave errors of ~50 on outputs of ~40) or the cast fails (bf16 under fp32).
            # DeepSpeed in bf16 / fp16 casts every parameter it does not partition, frozen ones too.
            param = _PARAM_DTYPE[cfg.train.precision]
            yield Problem(
                "method.quant.quant_storage_dtype",
                f"{quant.quant_storage_dtype} differs from {'FSDP2' if par.backend == 'fsdp' else 'DeepSpeed'}'s parameter dtype "
                f"{param} (train.precision {cfg.train.precision}), which it casts the packed 4-bit weights to",
                f"set method.quant.quant_storage_dtype and model.dtype to {param}"
                + (f", or train.precision to {_PRECISION[quant.quant_storage_dtype]}" if quant.quant_storage_dtype != "float16" else ""),
            )
        if par.backend == "deepspeed" and par.zero_stage < 2:
            yield Problem("parallel.zero_stage", f"QLoRA runs with ZeRO-2, not ZeRO-{par.zero_stage}", "set parallel.zero_stage: 2")
        elif par.backend == "deepspeed" and par.zero_stage == 3:
            # bitsandbytes' 4-bit layers are not built inside zero.Init: every rank would hold the
            # whole 4-bit base before deepspeed.initialize partitions it (FSDP2 quantises per shard).
            yield Problem(
                "parallel.zero_stage",
                "QLoRA under ZeRO-3 loads the whole 4-bit base on every rank before DeepSpeed partitions it",
                "use parallel.backend: fsdp (quantises and loads each rank's shard only), or parallel.zero_stage: 2",
            )
        if par.offload_params != "none":
            yield Problem("parallel.offload_params", "cannot offload 4-bit quantised weights", "set it to none for QLoRA")
        if cfg.model.dtype == "float16" and cpu:
            yield Problem("model.dtype", "float16 is not supported on the CPU", "use bfloat16")
    if method.name == "freeze" and cfg.model.num_layers is not None and method.freeze.trainable_last_layers > cfg.model.num_layers:
        yield Problem(
            "method.freeze.trainable_last_layers",
            f"{method.freeze.trainable_last_layers} > model.num_layers {cfg.model.num_layers}",
            f"use at most {cfg.model.num_layers}",
        )
    if (
        method.name == "freeze"
        and method.freeze.trainable_last_layers == 0
        and not (method.freeze.train_head or method.freeze.train_embeddings)
    ):
        yield Problem("method.freeze", "leaves nothing trainable", "raise trainable_last_layers or set train_head: true")
    if method.name == "prompt_tuning" and par.backend == "deepspeed" and par.zero_stage == 3:
        yield Problem("method.name", "prompt tuning is not supported under ZeRO-3", "use ZeRO 0-2 or FSDP")
    if method.name == "lora" and cfg.task == "classification" and par.backend == "deepspeed" and par.zero_stage == 3:
        # A causal LM's LoRA builds inside zero.Init (backends.py); a classifier's head, trained in full
        # beside the adapters, does not survive that build, so its base would be whole on every rank.
        yield Problem(
            "parallel.zero_stage",
            "a classifier's LoRA under ZeRO-3 loads the whole base on every rank before DeepSpeed partitions it",
            "use parallel.backend: fsdp (loads each rank's shard only), or parallel.zero_stage: 2",
        )

    if cfg.data.packing:
        # Packed rows hold several documents: the attention path must keep each inside its own.
        if method.name == "prompt_tuning":
            yield Problem(
                "data.packing", "prompt tuning prepends virtual tokens to each row, breaking document isolation", "set data.packing: false"
            )
        if cfg.model.trust_remote_code:
            yield Problem(
                "data.packing", "custom modeling code (trust_remote_code) may ignore the document mask", "set data.packing: false"
            )
        if cfg.kernels.attention == "eager" and not cpu:
            yield Problem(
                "data.packing",
                "eager attention builds a dense mask per packed row (slow, memory-hungry on GPU)",
                "use kernels.attention: auto",
            )
    if cfg.train.eval_exact_match and cfg.data.template == "text":
        yield Problem(
            "train.eval_exact_match",
            "needs prompts and answers but data.template is text",
            "set it to 0 or use an instruction/chat template",
        )
    yield from check_task(cfg, explicit)
    if cfg.data.datasets:
        # split and columns are inherited by the entries; path and format are not. Their defaults
        # (a base recipe's tiny-tasks) mean "no data chosen" and stay quiet.
        default = DataSection()
        for field in ("path", "format"):
            value = getattr(cfg.data, field)
            if value != getattr(default, field):
                yield Problem(
                    f"data.{field}",
                    f"is {value!r} but data.datasets lists the data sets: it would be ignored",
                    f"move it into each data.datasets entry ({field}: ...), or remove data.{field}",
                )
    if cfg.train.max_steps is not None and cfg.optim.warmup_steps > cfg.train.max_steps:
        yield Problem(
            "optim.warmup_steps",
            f"{cfg.optim.warmup_steps} > train.max_steps {cfg.train.max_steps}: the peak learning rate is never reached",
            "use fewer warmup steps",
        )
    if cluster.signal_seconds and SLURM_TIME.match(cluster.time) and _minutes(cluster.time) * 60 <= cluster.signal_seconds:
        yield Problem(
            "cluster.signal_seconds", f"{cluster.signal_seconds}s is not shorter than cluster.time {cluster.time}", "use a smaller value"
        )


EVAL_METRICS = {
    "causal_lm": ("val_loss", "val_ppl", "exact_match", "rouge_l"),
    "classification": ("val_loss", "accuracy", "precision", "recall", "f1"),
    "preference": ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_rewards/chosen", "val_logps/chosen"),
}


def check_task(cfg: RunConfig, explicit: set[str]) -> Iterator[Problem]:
    """The task's rules (causal LM or sequence classification) and the Trainer-style schedule keys."""
    train, data, method = cfg.train, cfg.data, cfg.method
    if train.epochs is not None and "train.max_steps" in explicit and train.max_steps is not None:
        yield Problem("train.epochs", "is exclusive with train.max_steps", "set one of them")
    if cfg.optim.warmup_ratio > 0 and cfg.optim.warmup_steps > 0:
        yield Problem("optim.warmup_ratio", "is exclusive with optim.warmup_steps", "set one of them")
    stopping = train.early_stopping
    if stopping.metric:
        known = EVAL_METRICS[cfg.task]
        if stopping.metric not in known:
            yield Problem(
                "train.early_stopping.metric", f"{stopping.metric!r} is not a {cfg.task} metric", f"use one of {', '.join(known)}"
            )
        if not (train.eval_every or train.eval_strategy == "epoch"):
            yield Problem("train.early_stopping", "needs evaluations during the run", "set train.eval_every or train.eval_strategy: epoch")
        if stopping.metric == "exact_match" and not train.eval_exact_match:
            yield Problem("train.early_stopping.metric", "exact_match is not computed", "set train.eval_exact_match > 0")
    if cfg.task == "classification":
        if data.packing:
            yield Problem(
                "data.packing",
                "packs several documents into a row, but a classifier reads one document per row (one label, one pooled token)",
                "set data.packing: false",
            )
        if method.name in ("qlora", "prompt_tuning"):
            yield Problem("method.name", f"{method.name} is not supported for classification", "use full, freeze or lora")
        if train.eval_exact_match:
            yield Problem("train.eval_exact_match", "generates answers, which a classifier does not", "set it to 0")
    elif cfg.task == "preference":
        yield from _check_preference(cfg, explicit)
    if cfg.task != "classification" and cfg.model.architecture in ENCODERS:
        yield Problem(
            "task",
            f"{cfg.model.architecture} is an encoder: it has no causal language-model head",
            "set task: classification, or use a decoder model (Llama, Qwen2, GPT-2, ...)",
        )


def _check_preference(cfg: RunConfig, explicit: set[str]) -> Iterator[Problem]:
    """task: preference: each setting in its range, each only where its loss reads it (one line per key)."""
    pref, data = cfg.preference, cfg.data
    if pref.beta <= 0:
        yield Problem("preference.beta", f"{pref.beta} is not positive", "use e.g. 0.1 (dpo, ipo) or 2.0 (simpo)")
    if not 0 <= pref.label_smoothing < 0.5:
        yield Problem("preference.label_smoothing", f"{pref.label_smoothing} is outside [0, 0.5)", "use 0 (no smoothing) or e.g. 0.1")
    elif pref.label_smoothing and pref.loss not in ("dpo", "simpo"):
        yield Problem("preference.label_smoothing", f"is not read by the {pref.loss} loss", "remove it, or use loss dpo or simpo")
    if pref.gamma < 0:
        yield Problem("preference.gamma", f"{pref.gamma} is negative", "use e.g. 0.5 (SimPO's target margin)")
    elif "preference.gamma" in explicit and pref.loss != "simpo":
        yield Problem(
            "preference.gamma", f"is SimPO's margin, not read by the {pref.loss} loss", "remove it, or set preference.loss: simpo"
        )
    if pref.orpo_lambda < 0:
        yield Problem("preference.orpo_lambda", f"{pref.orpo_lambda} is negative", "use e.g. 0.1")
    elif "preference.orpo_lambda" in explicit and pref.loss != "orpo":
        yield Problem(
            "preference.orpo_lambda", f"is ORPO's weight, not read by the {pref.loss} loss", "remove it, or set preference.loss: orpo"
        )
    if cfg.method.name == "prompt_tuning":
        yield Problem("method.name", "prompt_tuning is not supported for preference", "use full, freeze, lora or qlora")
    if cfg.train.eval_exact_match:
        yield Problem("train.eval_exact_match", "generates answers; a preference run is evaluated on its validation pairs", "set it to 0")
    if "data.template" in explicit:
        yield Problem("data.template", "is not read by task: preference (prompt/chosen/rejected are text or chat messages)", "remove it")
    if data.train_on_prompt:
        yield Problem("data.train_on_prompt", "has no meaning for preference pairs (only the responses are scored)", "set it to false")


def _minutes(time: str) -> float:
    """SLURM time string → minutes (the formats SLURM_TIME admits)."""
    days, dash, rest = time.partition("-")
    if not dash:
        rest, days = days, "0"
    parts = [int(p) for p in rest.split(":")]
    if dash:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # hours:minutes:seconds
        hours, minutes, seconds = parts
    else:  # minutes[:seconds]
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days) * 1440 + hours * 60 + minutes + seconds / 60


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module left half-imported
        return False


def _at_least(value: float, low: float, key: str) -> Iterator[Problem]:
    if value < low:
        yield Problem(key, f"{value} is less than {low}", f"use a value >= {low}")


def _fraction(value: float, key: str, upper_open: bool) -> Iterator[Problem]:
    if value < 0 or value > 1 or (upper_open and value == 1):
        yield Problem(key, f"{value} is outside [0, 1{')' if upper_open else ']'}", "use a fraction")


def _strings(obj: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _strings(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _strings(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value, prefix)
    elif isinstance(obj, str):
        yield prefix.rstrip("."), obj
