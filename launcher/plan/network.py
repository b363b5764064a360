"""cluster.network → the NCCL and libfabric variables a GPU job exports, and the defaults a job sets only
where the user's environment has not: PYTORCH_CUDA_ALLOC_CONF on GPUs, GOMP_SPINCOUNT on CPUs. A CPU
job gets no network variables: no NCCL there."""

from __future__ import annotations

import re

from launcher.config.schema import ClusterSection

# EFA instances with GPUDirect RDMA: p4d (A100 40GB), p4de (A100 80GB), p5 (H100), p5e/p5en (H200).
EFA_RDMA_GPUS = frozenset({"a100-40gb", "a100-80gb", "h100-80gb", "h200"})
# Expandable segments: the caching allocator grows segments instead of leaving odd-sized blocks
# behind, the fragmentation that ends long FSDP/ZeRO runs with an OOM at a few GiB free.
ENV_DEFAULTS = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# On CPU: how long an OpenMP thread of torch's (GNU libgomp) spins at a barrier before it sleeps.
# libgomp's default (300,000 spins) turns any other busy process into a stall: a thread that waits
# burns its core while the one it waits for has none, and the tiny recipe's one-process run with 2
# threads beside one busy process took 177 s instead of 7 (OMP_WAIT_POLICY=PASSIVE: 9.5 s, 1.38x
# slower on idle cores; 1000 spins: 11 s there, and the same speed on idle cores; tests/bench/RESULTS.md,
# "OpenMP threads beside a busy process").
CPU_ENV_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
_SAFE = re.compile(r"^[A-Za-z0-9_.:,=^-]*$")  # a default is written unquoted inside "${NAME:=value}"


def network_env(cluster: ClusterSection) -> dict[str, str]:
    """The variables cluster.network (with ib_hca and socket_ifname) sets in a GPU job."""
    if cluster.accelerator != "cuda":
        return {}
    env: dict[str, str] = {}
    match cluster.network:
        case "ib":  # InfiniBand or RoCE through NCCL's own verbs transport
            env["NCCL_IB_DISABLE"] = "0"
            if cluster.ib_hca:
                env["NCCL_IB_HCA"] = cluster.ib_hca
        case "efa":
            # AWS EFA through the aws-ofi-nccl plugin, per its cheat sheet (github.com/aws/aws-ofi-nccl,
            # doc/efa-env-var.md): FI_PROVIDER=efa keeps libfabric from falling back to TCP unnoticed;
            # FI_EFA_USE_DEVICE_RDMA=1 only on instances with GPUDirect RDMA (p4d/p4de/p5/p5e; it fails on
            # the others, and libfabric >= 1.18 turns it on by itself). NCCL_PROTO=simple is not set: only
            # aws-ofi-nccl <= 1.5 needs it, later plugins set it themselves where the platform requires it,
            # and forcing it on p5 gives up LL128 (aws-ofi-nccl PR #280). Add it in cluster.env for an old plugin.
            env["FI_PROVIDER"] = "efa"
            if cluster.gpu in EFA_RDMA_GPUS:
                env["FI_EFA_USE_DEVICE_RDMA"] = "1"
        case "socket":  # TCP only: no IB transport even where an HCA is found
            env["NCCL_IB_DISABLE"] = "1"
        case "auto":
            pass
    if cluster.socket_ifname:  # the interface NCCL bootstraps on (and, with socket, carries the data)
        env["NCCL_SOCKET_IFNAME"] = cluster.socket_ifname
    return env


def env_defaults(cluster: ClusterSection) -> dict[str, str]:
    """Variables a job sets only when the environment it starts in has not (the scripts write
    `: "${NAME:=value}"`); one that cluster.env sets is left to cluster.env."""
    defaults = ENV_DEFAULTS if cluster.accelerator == "cuda" else CPU_ENV_DEFAULTS
    out = {name: value for name, value in defaults.items() if name not in cluster.env}
    assert all(_SAFE.match(value) for value in out.values()), out
    return out
