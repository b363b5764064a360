"""The plan's memory and time estimate: per GPU item by item, per node host memory, per save, per step.

`estimate_plan(cfg, topology)` is what plan.json's `estimate` holds and estimate.txt renders;
`check_memory` refuses a plan over the GPU's memory (`check_fits`) or over the node's
`cluster.mem` (`check_host`); `choose_micro_batch` implements `train.auto_micro_batch`. Torch-free:
the model is a set of numbers from the resolved config.
"""

from __future__ import annotations

import dataclasses
import math
import re

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import GPU_MEMORY_GIB, ClusterSection, RunConfig
from launcher.plan.estimate.cost import (
    MFU,
    PEAK_TFLOPS,
    checkpoint_bytes,
    flops_per_token,
    host_bytes,
    model_flops_per_token,
    reference_flops_per_token,
    step_reference_flops,
    step_seconds,
    write_speed,
)
from launcher.plan.estimate.fixes import OFFLOADS, alternatives, with_setting
from launcher.plan.estimate.memory import GIB, Setting, estimate_memory
from launcher.plan.estimate.params import count_params
from launcher.plan.estimate.render import render_estimate
from launcher.plan.topology import Topology, build_topology

WARN_SHARE, AUTO_SHARE = 0.90, 0.90
# From here on FSDP2 over every rank all-gathers each block across the network: hsdp is worth a note.
HSDP_MIN_NODES = 16
SLURM_MEM_GIB = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}  # sbatch --mem: powers of 1024, M by default
__all__ = [
    "Setting",
    "check_fits",
    "check_host",
    "check_memory",
    "choose_micro_batch",
    "count_params",
    "estimate_memory",
    "estimate_plan",
    "render_estimate",
]


def gpu_memory_gib(cluster: ClusterSection) -> float | None:
    """The GPU memory the plan is checked against: what cluster.gpu has, or cluster.gpu_memory_gib
    when that is smaller (a MIG slice, memory kept back); a gpu_memory_gib above what the named GPU
    has (a recipe's 80 GiB default run with cluster.gpu=l4) cannot be right, so the GPU wins. Without
    cluster.gpu: gpu_memory_gib, else None (no check)."""
    if cluster.accelerator != "cuda":
        return None
    known = GPU_MEMORY_GIB.get(cluster.gpu)
    if known is None or cluster.gpu_memory_gib is None:
        return cluster.gpu_memory_gib if cluster.gpu_memory_gib is not None else known
    return min(known, cluster.gpu_memory_gib)


def gpu_memory_key(cluster: ClusterSection) -> str:
    """The recipe key the GPU limit came from, for the refusal's first word."""
    known = GPU_MEMORY_GIB.get(cluster.gpu)
    return (
        "cluster.gpu"
        if known is not None and (cluster.gpu_memory_gib is None or known < cluster.gpu_memory_gib)
        else "cluster.gpu_memory_gib"
    )


def host_memory_gib(cluster: ClusterSection) -> float | None:
    """cluster.mem per node in GiB (sbatch's sizes: K, M (the unit when none is given), G, T);
    None when empty (the cluster's default) or 0 (the whole node): no check."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", cluster.mem)
    if match is None or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * SLURM_MEM_GIB[match.group(2) or "M"]


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
        reference=reference_pass(cfg),
    )


def reference_pass(cfg: RunConfig) -> str:
    """How a run gets its reference log-probabilities (runtime/train/preference.py): none (not a
    preference run, or orpo/simpo), adapters (the same model with its adapters off, every
    micro-batch), stored (computed once before step 1 by the same sharded model, kept beside the data)."""
    if cfg.task != "preference" or not cfg.preference.needs_reference:
        return "none"
    return "adapters" if cfg.method.low_rank else "stored"


def estimate_plan(cfg: RunConfig, topology: Topology) -> dict[str, float]:
    """Every item in bytes (counts for params, seconds for times), plus the GPU's memory (0: unknown)."""
    setting = setting_of(cfg, topology)
    out = estimate_memory(setting)
    out.update(host_bytes(setting, out))
    out.update(checkpoint_bytes(setting, out))
    speed = write_speed(topology.nodes, cfg.cluster.fs_bandwidth_gbps, cfg.cluster.fs_total_gbps)
    out["checkpoint_seconds"], out["save_write_gbps"] = out["checkpoint_bytes"] / speed, speed / 1e9
    out["fs_bandwidth_gbps"] = cfg.cluster.fs_bandwidth_gbps or 0.0  # 0: FS_BYTES_PER_SECOND assumed
    out["flops_per_token"] = flops_per_token(setting)
    out["model_flops_per_token"] = model_flops_per_token(setting)  # the progress line's MFU on CUDA
    out["step_seconds"] = step_seconds(setting, cfg.cluster.gpu) if setting.cuda else 0.0
    # the reference pass: its forward per token; stored: done once, over the first epoch, before step 1
    reference = reference_flops_per_token(setting)
    out["reference_flops_per_token"], out["reference_stored"] = reference, float(setting.reference == "stored")
    out["reference_step_share"] = step_reference_flops(setting) / out["flops_per_token"]  # of each step's compute
    # stored: the pass's seconds for one step's rows (an epoch of N steps takes N times this)
    out["reference_seconds_per_step"] = step_seconds(setting, cfg.cluster.gpu, reference) if setting.cuda else 0.0
    out["peak_tflops"] = PEAK_TFLOPS.get(cfg.cluster.gpu, PEAK_TFLOPS["h100-80gb"])
    out["mfu"] = MFU
    out["gpu_memory_gib"] = gpu_memory_gib(cfg.cluster) or 0.0
    out["host_memory_gib"] = host_memory_gib(cfg.cluster) or 0.0
    return out


def fixes(cfg: RunConfig, estimate: dict[str, float]) -> str:
    """The changes that lower the estimate (`estimate`, this recipe's) per GPU, each with what it would
    need per GPU (and per node, for an offload), those that fit the GPU first."""
    limit = gpu_memory_gib(cfg.cluster)
    fitting: list[str] = []
    others: list[str] = []
    for label, alt in alternatives(cfg):
        e = estimate_plan(alt, build_topology(alt.cluster, alt.train, alt.data))
        if e["total"] >= estimate["total"]:  # more nodes under DDP or HSDP: nothing gained per GPU
            continue
        line = f"{label}: {e['total'] / GIB:.1f} GiB per GPU"
        if label.endswith(OFFLOADS):
            line += f" and {e['host_total'] / GIB:.0f} GiB of host memory per node"
            host = host_memory_gib(cfg.cluster)
            line += f" (over cluster.mem {cfg.cluster.mem})" if host and e["host_total"] > host * GIB else ""
        (fitting if limit and e["total"] <= limit * GIB else others).append(line)
    if not fitting + others:
        return "no single change lowers it; see `launcher estimate` for the items"
    return "try " + "; ".join(fitting + others) + " (see `launcher estimate` for the items)"


def check_fits(cfg: RunConfig, estimate: dict[str, float]) -> str | None:
    """Raise ConfigError over 100 % of the GPU's memory; return a warning line over 90 %."""
    limit = estimate.get("gpu_memory_gib", 0.0)
    if not limit:
        return None
    total = estimate["total"] / GIB
    share = total / limit
    if share > 1:
        gpu = f" ({cfg.cluster.gpu})" if gpu_memory_key(cfg.cluster) == "cluster.gpu" else ""
        what = f"the estimate is {total:.1f} GiB per GPU, {share:.0%} of the GPU's {limit:g} GiB{gpu}"
        raise ConfigError([Problem(gpu_memory_key(cfg.cluster), what, fixes(cfg, estimate))])
    if share > WARN_SHARE:
        return f"warning: memory: the estimate is {total:.1f} GiB per GPU, {share:.0%} of {limit:g} GiB (little headroom); {fixes(cfg, estimate)}"
    return None


def host_fixes(cfg: RunConfig, estimate: dict[str, float], limit_gib: float) -> str:
    """The changes that lower the host side per node, or make room for it: the nodes (doubling) that
    spread the offloaded states thin enough, the cluster.mem that holds them, less offload."""
    par, nodes = cfg.parallel, cfg.cluster.nodes
    out = []
    offloaded = estimate["host_offloaded"] * nodes  # sharded over every node (not under HSDP: per node)
    room = WARN_SHARE * limit_gib * GIB - (estimate["host_total"] - estimate["host_offloaded"])
    if offloaded and room > 0 and not (par.backend == "fsdp" and par.fsdp.hsdp):
        more = nodes * 2 ** max(1, math.ceil(math.log2(offloaded / room / nodes)))
        out.append(f"more nodes (cluster.nodes={more})")
    out.append(f"more memory per node (cluster.mem={math.ceil(estimate['host_total'] / GIB / WARN_SHARE)}G)")
    if par.backend == "deepspeed" and par.offload_params != "none":
        out.append("parallel.offload_params=none")
    elif par.backend == "deepspeed" and par.offload_optimizer != "none":
        out.append("parallel.offload_optimizer=none")
    if par.backend == "fsdp" and par.fsdp.cpu_offload:
        out.append("parallel.fsdp.cpu_offload=false")
    return "try " + ", ".join(out) + "; see `launcher estimate` for the items"


def check_host(cfg: RunConfig, estimate: dict[str, float]) -> str | None:
    """Raise ConfigError when the host side per node (offloaded states, the ranks' processes, data
    loaders) is over cluster.mem; return a warning line over 90 %. No check without a size."""
    limit = estimate.get("host_memory_gib", 0.0)
    if not limit:
        return None
    total = estimate["host_total"] / GIB
    share = total / limit
    offloaded = f", {estimate['host_offloaded'] / GIB:.1f} GiB of it offloaded states" if estimate.get("host_offloaded") else ""
    what = (
        f"the estimate is {total:.1f} GiB of host memory per node{offloaded}, {share:.0%} of cluster.mem {cfg.cluster.mem} ({limit:g} GiB)"
    )
    if share > 1:
        raise ConfigError([Problem("cluster.mem", what, host_fixes(cfg, estimate, limit))])
    if share > WARN_SHARE:
        return f"warning: host memory: {what} (little headroom); {host_fixes(cfg, estimate, limit)}"
    return None


def hsdp_note(cfg: RunConfig, estimate: dict[str, float]) -> str | None:
    """FSDP2 sharded over all of HSDP_MIN_NODES nodes or more: a note proposing parallel.fsdp.hsdp
    when sharding within a node fits (its estimate within WARN_SHARE of the GPU); else None."""
    par, cluster = cfg.parallel, cfg.cluster
    limit = estimate.get("gpu_memory_gib", 0.0)
    if par.backend != "fsdp" or par.fsdp.hsdp or cluster.nodes < HSDP_MIN_NODES or not limit:
        return None
    hsdp = with_setting(cfg, "parallel.fsdp", hsdp=True)
    total = estimate_plan(hsdp, build_topology(hsdp.cluster, hsdp.train, hsdp.data))["total"] / GIB
    if total > WARN_SHARE * limit:
        return None
    return (
        f"note: parallel.fsdp.hsdp=true fits ({total:.1f} GiB per GPU, {total / limit:.0%} of {limit:g} GiB): FSDP2 would shard "
        f"within each node's {cluster.gpus_per_node} GPUs and replicate across the {cluster.nodes} nodes, so the blocks' "
        "all-gathers and reduce-scatters stay inside a node and only an all-reduce of the gradient shards crosses the network"
    )


def check_memory(cfg: RunConfig, estimate: dict[str, float]) -> list[str]:
    """Both checks: one ConfigError with every refusal (GPU and host), else the warning lines (and
    the HSDP note)."""
    problems: list[Problem] = []
    warnings: list[str] = []
    for check in (check_fits, check_host):
        try:
            line = check(cfg, estimate)
        except ConfigError as exc:
            problems += exc.problems
        else:
            warnings += [line] if line else []
    if problems:
        raise ConfigError(problems)
    note = hsdp_note(cfg, estimate)
    return warnings + ([note] if note else [])


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
