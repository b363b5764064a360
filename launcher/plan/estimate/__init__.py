"""The plan's memory and time estimate: per GPU item by item, per node host memory, per save, per step.

`estimate_plan(cfg, topology)` is what plan.json's `estimate` holds and estimate.txt renders;
`check_fits` refuses a plan over `cluster.gpu_memory_gib`; `choose_micro_batch` implements
`train.auto_micro_batch`. Torch-free: the model is a set of numbers from the resolved config.
"""

from __future__ import annotations

import dataclasses

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import GPU_MEMORY_GIB, ClusterSection, RunConfig
from launcher.plan.estimate.cost import MFU, PEAK_TFLOPS, checkpoint_bytes, flops_per_token, host_bytes, model_flops_per_token, step_seconds
from launcher.plan.estimate.memory import GIB, Setting, estimate_memory
from launcher.plan.estimate.params import count_params
from launcher.plan.estimate.render import render_estimate
from launcher.plan.topology import Topology, build_topology

WARN_SHARE, AUTO_SHARE = 0.90, 0.90
__all__ = ["Setting", "check_fits", "choose_micro_batch", "count_params", "estimate_memory", "estimate_plan", "render_estimate"]


def gpu_memory_gib(cluster: ClusterSection) -> float | None:
    """cluster.gpu_memory_gib, else what cluster.gpu implies, else None (no check)."""
    if cluster.accelerator != "cuda":
        return None
    return cluster.gpu_memory_gib if cluster.gpu_memory_gib is not None else GPU_MEMORY_GIB.get(cluster.gpu)


def setting_of(cfg: RunConfig, topology: Topology) -> Setting:
    return Setting(
        model=cfg.model,
        method=cfg.method,
        parallel=cfg.parallel,
        train=cfg.train,
        kernels=cfg.kernels,
        seq_len=cfg.data.max_seq_len,
        topology=topology,
        cuda=cfg.cluster.accelerator == "cuda",
        task=cfg.task,
    )


def estimate_plan(cfg: RunConfig, topology: Topology) -> dict[str, float]:
    """Every item in bytes (counts for params, seconds for times), plus the GPU's memory (0: unknown)."""
    setting = setting_of(cfg, topology)
    out = estimate_memory(setting)
    out.update(host_bytes(setting, out))
    out.update(checkpoint_bytes(setting, out))
    out["flops_per_token"] = flops_per_token(setting)
    out["model_flops_per_token"] = model_flops_per_token(setting)  # the progress line's MFU on CUDA
    out["step_seconds"] = step_seconds(setting, cfg.cluster.gpu) if setting.cuda else 0.0
    out["peak_tflops"] = PEAK_TFLOPS.get(cfg.cluster.gpu, PEAK_TFLOPS["h100-80gb"])
    out["mfu"] = MFU
    out["gpu_memory_gib"] = gpu_memory_gib(cfg.cluster) or 0.0
    return out


def fixes(cfg: RunConfig) -> str:
    """The changes that lower the estimate, for this recipe."""
    par, t = cfg.parallel, cfg.train
    out = [f"more nodes (cluster.nodes={cfg.cluster.nodes * 2})"]
    if par.backend == "deepspeed" and par.zero_stage < 3:
        out.append("parallel.zero_stage=3")
    if par.backend == "ddp":
        out.append("parallel.backend=fsdp")
    if par.backend == "deepspeed" and par.offload_optimizer == "none":
        out.append("parallel.offload_optimizer=cpu")
    if par.backend == "fsdp" and par.fsdp.defer_grad_sync:
        out.append("parallel.fsdp.defer_grad_sync=false")
    if t.checkpointing != "full":
        out.append("train.activation_checkpointing=true" if t.checkpointing == "none" else "train.activation_checkpointing=full")
    if (t.micro_batch_size or 1) > 1:
        out.append(f"train.micro_batch_size={(t.micro_batch_size or 2) // 2}")
    if cfg.kernels.loss == "plain" and cfg.task == "causal_lm":
        out.append("kernels.loss=auto")
    return "try " + ", ".join(out) + "; see `launcher estimate` for the items"


def check_fits(cfg: RunConfig, estimate: dict[str, float]) -> str | None:
    """Raise ConfigError over 100 % of the GPU's memory; return a warning line over 90 %."""
    limit = estimate.get("gpu_memory_gib", 0.0)
    if not limit:
        return None
    total = estimate["total"] / GIB
    share = total / limit
    if share > 1:
        what = f"the estimate is {total:.1f} GiB per GPU, {share:.0%} of the GPU's {limit:g} GiB"
        raise ConfigError([Problem("cluster.gpu_memory_gib", what, fixes(cfg))])
    if share > WARN_SHARE:
        return f"warning: memory: the estimate is {total:.1f} GiB per GPU, {share:.0%} of {limit:g} GiB (little headroom); {fixes(cfg)}"
    return None


def choose_micro_batch(cfg: RunConfig) -> tuple[RunConfig, dict[int, float]]:
    """train.auto_micro_batch: the largest power-of-two micro-batch within AUTO_SHARE of the GPU's
    memory that divides the global batch; returns the config with micro-batch and accumulation set,
    and every candidate's estimated total (bytes)."""
    limit = gpu_memory_gib(cfg.cluster)
    t = cfg.train
    assert t.global_batch_size and limit, "validate() first"
    per_rank = t.global_batch_size // (cfg.cluster.nodes * cfg.cluster.gpus_per_node)
    candidates: dict[int, float] = {}
    chosen = 1
    micro = 1
    while micro <= per_rank:
        if per_rank % micro == 0:
            trial = dataclasses.replace(
                cfg, train=dataclasses.replace(t, micro_batch_size=micro, gradient_accumulation_steps=per_rank // micro)
            )
            total = estimate_plan(trial, build_topology(trial.cluster, trial.train, trial.data))["total"]
            candidates[micro] = total
            if total <= AUTO_SHARE * limit * GIB:
                chosen = micro
        micro *= 2
    train = dataclasses.replace(t, micro_batch_size=chosen, gradient_accumulation_steps=per_rank // chosen)
    return dataclasses.replace(cfg, train=train), candidates
