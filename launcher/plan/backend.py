"""`parallel.backend: auto` → a concrete backend, decided once at plan time from the memory estimate.

DDP keeps the whole training state on every rank and only all-reduces gradients, the cheapest
backend when that state fits; FSDP2 shards it when it does not. DeepSpeed is never picked: it is
used only when a recipe asks for it. A candidate that validation refuses for this recipe (an FSDP
setting, QLoRA's storage dtype under FSDP2, ...) is never picked either, so the ranks always get a
backend `validate` accepts. Torch-free, pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import GPU_MEMORY_GIB, FsdpSection, RunConfig
from launcher.config.validate import check_combinations
from launcher.plan.estimate import choose_micro_batch, estimate_plan, gpu_memory_gib
from launcher.plan.estimate.memory import GIB
from launcher.plan.topology import build_topology

DDP_SHARE = 0.80  # DDP when its whole estimate stays within this share of the GPU's memory
CPU_DDP_GIB = 2.0  # on CPU (no device limit to compare with): DDP when a process's state is this small
UNKNOWN_GPU_GIB = min(GPU_MEMORY_GIB.values())  # GPU memory not given: assume the smallest known GPU
DEEPSPEED_KEYS = ("zero_stage", "offload_optimizer", "offload_params", "nvme_path")


@dataclass(frozen=True)
class BackendChoice:
    requested: str  # what the recipe says: auto or a backend
    chosen: str  # what the ranks run
    reason: str  # one line, for the plan summary and plan.json


def with_backend(cfg: RunConfig, backend: str) -> RunConfig:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend=backend))  # type: ignore[arg-type]


def resolve_backend(cfg: RunConfig) -> tuple[RunConfig, BackendChoice]:
    """The config with a concrete parallel.backend, and why. An explicit backend is kept as is.
    Raises ConfigError when validation refuses every candidate (naming the problems of FSDP2's)."""
    requested = cfg.parallel.backend
    if requested != "auto":
        return cfg, BackendChoice(requested, requested, "set in the recipe")
    refused = {name: _refusals(cfg, name) for name in ("single", "ddp", "fsdp")}
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if world == 1 and not refused["single"]:
        return with_backend(cfg, "single"), BackendChoice("auto", "single", "auto: one process, nothing to replicate or shard")
    if refused["ddp"]:
        why = f"ddp is refused here ({refused['ddp'][0].key}: {refused['ddp'][0].what})"
    else:
        total = ddp_total(cfg)
        fits, why = _ddp_fits(cfg, total)
        if fits:
            return with_backend(cfg, "ddp"), BackendChoice("auto", "ddp", f"auto: {why}")
    if refused["fsdp"]:
        head = Problem(
            "parallel.backend",
            f"auto found no backend for this recipe: {why}, and fsdp is refused",
            "fix the lines below, or set parallel.backend",
        )
        raise ConfigError([head, *refused["fsdp"]])
    return with_backend(cfg, "fsdp"), BackendChoice("auto", "fsdp", f"auto: {why}; FSDP2 shards it over {world} ranks")


def ddp_total(cfg: RunConfig) -> float:
    """DDP's estimated bytes per device: parameters, gradients (and their buckets), AdamW states and
    activations at the planned micro-batch (with auto_micro_batch: the one FSDP2 would get)."""
    trial = with_backend(cfg, "ddp")
    if cfg.train.auto_micro_batch:
        sharded, _ = choose_micro_batch(with_backend(cfg, "fsdp"))
        trial = dataclasses.replace(trial, train=sharded.train)
    return estimate_plan(trial, build_topology(trial.cluster, trial.train, trial.data))["total"]


def _ddp_fits(cfg: RunConfig, total: float) -> tuple[bool, str]:
    """Whether DDP's state fits with margin, and the words for it either way."""
    state = f"the whole training state, {size(total)},"
    if cfg.cluster.accelerator != "cuda":
        if total <= CPU_DDP_GIB * GIB:
            return True, f"{state} is small (<= {CPU_DDP_GIB:g} GiB per CPU process)"
        return False, f"{state} is over {CPU_DDP_GIB:g} GiB per CPU process"
    limit = gpu_memory_gib(cfg.cluster)
    assumed = "" if limit else f" (memory not given: assumed {UNKNOWN_GPU_GIB:g} GiB; set cluster.gpu_memory_gib)"
    limit = limit or UNKNOWN_GPU_GIB
    if total <= DDP_SHARE * limit * GIB:
        return True, f"{state} fits on each {limit:g} GiB GPU with margin{assumed}"
    return False, f"{state} is over {DDP_SHARE:.0%} of each {limit:g} GiB GPU{assumed}"


def _refusals(cfg: RunConfig, backend: str) -> list[Problem]:
    """What validation says against this backend for this recipe, beyond what it says anyway."""
    # The backend rules compare each parallel setting with its default, so every one counts as set.
    explicit = {f"parallel.{key}" for key in DEEPSPEED_KEYS}
    explicit |= {f"parallel.fsdp.{f.name}" for f in dataclasses.fields(FsdpSection)}
    anyway = set(check_combinations(cfg, explicit))
    return [p for p in check_combinations(with_backend(cfg, backend), explicit) if p not in anyway]


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:,.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 1024**2:,.1f} MiB"
