"""The save budget: does the warning SLURM sends before the time limit (cluster.signal_seconds)
leave room to finish the step in flight and write a checkpoint? And how long may a collective wait
(cluster.collective_timeout_seconds) before it is a hang? Torch-free, from the estimate."""

from __future__ import annotations

import math

from launcher.config.schema import ClusterSection
from launcher.plan.estimate.cost import write_speed

MARGIN = 1.5  # the estimate is rough, and a save that does not finish is lost whole
NCCL_TIMEOUT_SECONDS = 600  # torch's default for NCCL groups: never planned shorter
# A timeout too short kills a healthy job mid-save; one too long only lets a hung job sit longer.
TIMEOUT_MARGIN = 2.0


def save_seconds(cluster: ClusterSection, checkpoint_bytes: float) -> float:
    """One save, all nodes writing (estimate/cost.write_speed: per node, capped by the file system's total)."""
    return checkpoint_bytes / write_speed(cluster.nodes, cluster.fs_bandwidth_gbps, cluster.fs_total_gbps)


def save_budget_warning(cluster: ClusterSection, estimate: dict[str, float]) -> str | None:
    """One warning line when signal_seconds is short of a step plus a save (with MARGIN); None when it
    covers them, or when there is no signal window (signal_seconds 0)."""
    if not cluster.signal_seconds:
        return None
    save = save_seconds(cluster, estimate["checkpoint_bytes"])
    step = estimate.get("step_seconds", 0.0)  # 0 on CPU plans: no figure for the step itself
    needed = (save + step) * MARGIN
    if needed <= cluster.signal_seconds:
        return None
    speed = f"{cluster.fs_bandwidth_gbps:g} GB/s per node" if cluster.fs_bandwidth_gbps else "an assumed 2 GB/s per node"
    suggest = max(60, math.ceil(needed / 60) * 60)
    fix = f"raise cluster.signal_seconds to {suggest}"
    if not cluster.fs_bandwidth_gbps:
        fix += ", or set cluster.fs_bandwidth_gbps to the file system's write speed"
    return (
        f"warning: cluster.signal_seconds: {cluster.signal_seconds} s may not cover a save before the time limit: "
        f"a step (~{step:.0f} s) then a {estimate['checkpoint_bytes'] / 1e9:.0f} GB checkpoint at {speed} (~{save:.0f} s), "
        f"x{MARGIN:g} for safety, is ~{needed:.0f} s; {fix}"
    )


def collective_timeout(cluster: ClusterSection, estimate: dict[str, float]) -> int:
    """cluster.collective_timeout_seconds, else the longest wait a healthy job has (a step, then
    the other ranks at a barrier while a checkpoint is written) x TIMEOUT_MARGIN, in whole minutes,
    at least NCCL's 10 min."""
    if cluster.collective_timeout_seconds:
        return cluster.collective_timeout_seconds
    wait = (save_seconds(cluster, estimate["checkpoint_bytes"]) + estimate.get("step_seconds", 0.0)) * TIMEOUT_MARGIN
    return max(NCCL_TIMEOUT_SECONDS, math.ceil(wait / 60) * 60)
