"""`python -m launcher.doctor_job SETTINGS.json`: what `launcher doctor RECIPE --nodes N` checks on the
real allocation, run by every rank (started by the agent, like the training ranks).

Every rank joins one all-reduce, timed at a few sizes (bus bandwidth as nccl-tests reports it); each
node's first rank checks its node (a marker in the output dir, free disk, /dev/shm, `ulimit -l`, host
and GPU memory, versions, the model in the cache). Rank 0 gathers the results and prints one line per
check and result, naming the nodes, with the fix; the same lines go to DOCTOR_DIR/report-JOBID.txt.
SETTINGS.json is written by `launcher doctor` (launcher/doctor.py) from the recipe and its estimate.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from launcher.doctor import Check, Status

KIB, MIB, GIB = 1024, 1024**2, 1024**3
# Sizes timed (bytes of float32 per rank): small enough for gloo on a laptop, large enough for NCCL's bus.
SIZES = {"cpu": (64 * KIB, 1 * MIB, 8 * MIB), "cuda": (1 * MIB, 16 * MIB, 256 * MIB)}
ITERATIONS = {"cpu": (2, 5), "cuda": (5, 20)}  # warm-up, timed
SLOW_NETWORK_GBPS = 4.0  # bus bandwidth across GPU nodes below this: NCCL is probably on TCP sockets
SHM_LOW = 1 * GIB  # NCCL's shared-memory transport and DataLoader workers live in /dev/shm


def bus_bandwidth(nbytes: int, seconds: float, world_size: int) -> float:
    """An all-reduce's bus bandwidth in bytes/s, as nccl-tests defines it: algbw x 2(n-1)/n, the
    bytes each rank's link carries (a ring sends and receives 2(n-1)/n of the buffer)."""
    algbw = nbytes / seconds
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def _bytes(nbytes: float) -> str:
    """Disk sizes in powers of 1000, as df -H and estimate.txt give them."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def check_allreduce(settings: dict[str, Any], device: Any) -> Check:
    """Every rank: a correctness sum, then each size timed; the slowest rank's time counts."""
    import torch
    import torch.distributed as dist

    world, accel = dist.get_world_size(), settings["accelerator"]
    probe = torch.full((4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(probe)
    if probe[0].item() != world * (world + 1) / 2:
        return Check("fail", "all-reduce", f"wrong sum {probe[0].item()} over {world} ranks", "check the nodes' NCCL and drivers")
    warmup, timed = ITERATIONS[accel]
    figures, last = [], 0.0
    for nbytes in SIZES[accel]:
        buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(buffer)
        if accel == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(timed):
            dist.all_reduce(buffer)
        if accel == "cuda":
            torch.cuda.synchronize()
        seconds = torch.tensor([(time.perf_counter() - start) / timed], device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        last = bus_bandwidth(nbytes, seconds.item(), world) / 1e9
        figures.append(f"{_size(nbytes)} {last:.2f} GB/s")
    backend = dist.get_backend()
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", settings["nodes"]))
    found = f"{world} ranks on {nodes} node(s) over {backend}, sum correct; bus bandwidth {', '.join(figures)}"
    if accel == "cuda" and nodes > 1 and last < SLOW_NETWORK_GBPS:
        fix = "NCCL is probably on TCP sockets: set cluster.network=ib (cluster.ib_hca) or efa, and check NCCL_DEBUG=INFO's transport"
        return Check("warn", "all-reduce", found + f" (below {SLOW_NETWORK_GBPS:g} GB/s between nodes)", fix)
    return Check("ok", "all-reduce", found)


def check_disk(settings: dict[str, Any]) -> Check:
    keep, save = settings["keep_last"], settings["checkpoint_bytes"]
    need = (keep + 1) * save
    free = shutil.disk_usage(settings["run_dir"]).free
    found = f"{_bytes(free)} free at {settings['run_dir']} for checkpoint.keep_last {keep} + 1 save in flight x {_bytes(save)}"
    if free < need:
        fix = "free space, put run.output_dir on a larger file system, or lower checkpoint.keep_last"
        return Check("fail", "disk", found + f" = {_bytes(need)}", fix)
    return Check("ok", "disk", found)


def check_shm(settings: dict[str, Any]) -> Check:
    fix = "give the nodes a larger /dev/shm (containers: --shm-size=16g or --ipc=host)"
    gpus = settings["accelerator"] == "cuda" and settings["procs_per_node"] > 1
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return Check("fail" if gpus else "warn", "shm", "/dev/shm is missing", fix)
    size, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    found = f"/dev/shm {size / GIB:.1f} GiB ({free / GIB:.1f} GiB free)"
    status: Status = "ok" if size >= SHM_LOW else ("fail" if gpus and size < 256 * MIB else "warn")
    return Check(status, "shm", found + ("" if status == "ok" else f", under {_size(SHM_LOW)}"), fix)


def check_memlock(settings: dict[str, Any]) -> Check:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    found = "unlimited" if soft == resource.RLIM_INFINITY else _size(soft)
    if soft == resource.RLIM_INFINITY or settings["accelerator"] != "cuda":
        return Check("ok", "ulimit -l", found + ("" if settings["accelerator"] == "cuda" else " (pinned memory: not needed on CPU)"))
    rdma = settings["network"] in ("ib", "efa")
    fix = "ulimit -l unlimited for jobs (limits.conf memlock, slurmd LimitMEMLOCK=infinity, PropagateResourceLimits)"
    return Check("fail" if rdma else "warn", "ulimit -l", found + ": pinned memory (CPU offload, RDMA) is capped", fix)


def _meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0]) * KIB
    return fields


def check_host_memory(settings: dict[str, Any]) -> Check:
    info = _meminfo()
    total, need = info["MemTotal"], settings["host_bytes"]
    allocated = int(os.environ["SLURM_MEM_PER_NODE"]) * MIB if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit() else 0
    limit = min(total, allocated) if allocated else total
    found = f"{total / GIB:.1f} GiB on the node" + (
        f", {allocated / GIB:.1f} GiB allocated (cluster.mem {settings['mem']})" if allocated else ""
    )
    found += f"; the plan needs {need / GIB:.1f} GiB per node"
    if need > limit:
        return Check("fail", "host memory", found, "raise cluster.mem (or 0: the whole node), or offload less")
    if need > info.get("MemAvailable", total):
        return Check("warn", "host memory", found + f", {info['MemAvailable'] / GIB:.1f} GiB available now", "find what else holds memory")
    return Check("ok", "host memory", found)


def check_gpus(settings: dict[str, Any]) -> list[Check]:
    import torch

    versions = f"torch {torch.__version__}"
    if settings["accelerator"] != "cuda":
        return [Check("ok", "versions", versions + " (CPU)")]
    if not torch.cuda.is_available():
        return [Check("fail", "gpus", "no CUDA device visible", "run on GPU nodes with a CUDA build of torch")]
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    count, want = torch.cuda.device_count(), settings["gpu_memory_gib"]
    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GIB
    checks = [Check("ok", "versions", f"{versions}, CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.get_device_name(0)}")]
    if count < settings["procs_per_node"]:
        checks.append(Check("fail", "gpus", f"{count} visible, {settings['procs_per_node']} wanted", "set cluster.gpus_per_node"))
    found = f"{smallest:.1f} GiB per GPU" + (f", the plan assumed {want:g} GiB" if want else "")
    short = want and smallest < want * 0.98
    fix = f"set cluster.gpu (or cluster.gpu_memory_gib={smallest:.0f}) and plan again"
    checks.append(Check("fail" if short else "ok", "gpu memory", found, fix))
    return checks


def check_model_cache(settings: dict[str, Any]) -> Check:
    from launcher.config.resolve import TINY_MODEL

    name, local_dir = settings["model"], settings["model_local_dir"]
    fix = "run `launcher prepare RECIPE` where the Hub is reachable, with the cache (HF_HOME, LAUNCHER_CACHE_DIR) on a shared file system"
    if name == TINY_MODEL:
        from launcher.runtime.model.tiny import tiny_model_dir

        where = tiny_model_dir()
        found = (where / "config.json").is_file()
        return Check("ok" if found else "warn", "model cache", f"{name} {'built at' if found else 'not built yet at'} {where}", fix)
    candidates = [Path(name).expanduser(), Path(local_dir)] if local_dir else [Path(name).expanduser()]
    if "/" in name and not Path(name).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            candidates += [Path(cached).parent] if isinstance(cached, str) else []
        except Exception:  # no cache, or an id huggingface_hub refuses: not cached
            pass
    for path in candidates:
        if (path / "config.json").is_file() and next(path.glob("*.safetensors"), None) is not None:
            return Check("ok", "model cache", f"{name} at {path}")
    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes", "ON", "on")
    return Check(
        "fail" if offline else "warn",
        "model cache",
        f"{name}: no config.json and weights on this node" + (" (offline)" if offline else ""),
        fix,
    )


def node_checks(settings: dict[str, Any], marker: Path) -> list[Check]:
    """The checks one rank per node runs; the marker proves this node can write the output dir."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(socket.gethostname() + "\n")
        wrote = Check("ok", "shared output", f"wrote {marker.name}")
    except OSError as exc:
        wrote = Check(
            "fail", "shared output", f"cannot write {marker.parent} ({exc.strerror})", "make run.output_dir writable on every node"
        )
    checks = [wrote, check_disk(settings), check_shm(settings), check_memlock(settings), check_host_memory(settings)]
    return checks + check_gpus(settings) + [check_model_cache(settings)]


def check_shared(markers: Path, nodes: list[str]) -> Check:
    """Rank 0: every node's marker is visible here, so the output dir is one file system for all."""
    seen = {p.name for p in markers.iterdir()} if markers.is_dir() else set()
    missing = [node for i, node in enumerate(nodes) if f"node-{i}" not in seen]
    if missing:
        fix = "put run.output_dir on a file system every node mounts (checkpoints are written by all ranks, read after a requeue)"
        return Check("fail", "shared output", f"{markers} does not show the markers of {', '.join(missing)}", fix)
    return Check(
        "ok", "shared output", f"{markers.parent.parent} is shared: the marker of each of {len(nodes)} node(s) seen from {nodes[0]}"
    )


def merge(per_node: list[tuple[str, list[Check]]]) -> list[Check]:
    """One line per check and result, naming the nodes that gave it (all of them: 'all N nodes')."""
    groups: dict[tuple[str, Status, str, str], list[str]] = {}
    for node, checks in per_node:
        for c in checks:
            groups.setdefault((c.name, c.status, c.found, c.fix), []).append(node)
    out = []
    for (name, status, found, fix), nodes in groups.items():
        where = (
            f"all {len(nodes)} nodes"
            if len(nodes) == len(per_node) > 1
            else ", ".join(nodes[:8]) + (f" +{len(nodes) - 8}" if len(nodes) > 8 else "")
        )
        out.append(Check(status, name, f"{found} [{where}]", fix))
    return out


def versions_agree(per_node: list[tuple[str, list[Check]]]) -> list[Check]:
    found = {c.found for _, checks in per_node for c in checks if c.name == "versions"}
    if len(found) > 1:
        return [
            Check(
                "warn", "versions", f"{len(found)} different setups across the nodes", "install the same torch (and CUDA, NCCL) everywhere"
            )
        ]
    return []


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    settings = json.loads(Path(argv[0]).read_text())
    cuda = settings["accelerator"] == "cuda"
    local_rank, node_rank = int(os.environ["LOCAL_RANK"]), int(os.environ["GROUP_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=settings["collective_timeout"]))
    job = os.environ.get("SLURM_JOB_ID", "local")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    markers = Path(settings["doctor_dir"]) / f"nodes-{job}"
    mine = node_checks(settings, markers / f"node-{node_rank}") if local_rank == 0 else []
    allreduce = check_allreduce(settings, device)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (node_rank, node, mine))
    if dist.get_rank() == 0:
        per_node = sorted((g for g in gathered if g[2]), key=lambda g: g[0])
        nodes = [n for _, n, _ in per_node]
        node_lines = [(n, [c for c in checks if not (c.name == "shared output" and c.status == "ok")]) for _, n, checks in per_node]
        checks = [allreduce, check_shared(markers, nodes)] + merge(node_lines) + versions_agree(node_lines)
        failed = [c.name for c in checks if c.status == "fail"]
        lines = [c.line() for c in checks]
        label = f" for {settings['recipe']} on {len(nodes)} node(s)"
        warned = sum(c.status == "warn" for c in checks)
        lines.append(
            f"doctor: {len(failed)} check(s) failed{label}: {', '.join(dict.fromkeys(failed))}"
            if failed
            else f"doctor: ready{label} ({warned} warning(s))"
        )
        Path(settings["doctor_dir"], f"report-{job}.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
