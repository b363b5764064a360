"""Process group, device, seeds and teardown: the only place that initialises torch.distributed."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(accelerator: str, cpu_offload: bool = False, timeout_seconds: int | None = None) -> DistInfo:
    """Join the job's process group (gloo on CPU, nccl on CUDA) from torchrun's environment.

    FSDP2 CPU offload keeps gradients on the CPU, so clipping reduces CPU tensors: it needs a CPU
    backend beside NCCL in the same group ("cuda:nccl,cpu:gloo"). `timeout_seconds` (the plan's
    cluster.collective_timeout_seconds; None: torch's defaults) bounds every collective of every
    group, this one and those made later (set_collective_timeout)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.accelerator is cuda but this machine has no CUDA device; use cluster.accelerator=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m launcher.runtime`: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    timeout = set_collective_timeout(timeout_seconds) if timeout_seconds else None
    device_id = device if accelerator == "cuda" else None
    store = _launcher_store(rank, world, timeout)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device_id, store=store, timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def set_collective_timeout(seconds: int) -> timedelta:
    """Make `seconds` the timeout of every process group created from now on without one of its own.

    torch gives a new group its backend's default (10 min NCCL, 30 min gloo), not the default
    group's timeout, and the groups we do not create ourselves (DeviceMesh's per-dimension groups
    for HSDP, DeepSpeed's, the async save's gloo groups) pass none: torch reads these two module
    values each time (distributed_c10d._get_default_timeout), so setting them reaches all of them."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def _launcher_store(rank: int, world: int, timeout: timedelta | None = None) -> Any:
    """Under `launcher run` (launcher/ranks.py), the rendezvous store on the socket `launcher run`
    bound and listened on before starting the ranks, passed to rank 0 as LAUNCHER_STORE_FD: the port
    is never free between being chosen and being used, so another process cannot take it. None
    elsewhere (torchrun, SLURM): init_process_group's env:// store."""
    if "LAUNCHER_STORE_FD" not in os.environ and "LAUNCHER_STORE_CLIENT" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    timeout = timeout or default_pg_timeout
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        fd = int(os.environ["LAUNCHER_STORE_FD"])
        return dist.TCPStore(host, port, world, is_master=True, master_listen_fd=fd, timeout=timeout, use_libuv=False)
    return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_sum(values: torch.Tensor) -> Callable[[], list[float]]:
    """Begin a sum all-reduce of a 1-D float64 tensor; the returned call waits for it and gives the
    sums, so the work in between (the optimizer step) hides the collective's latency."""
    work = dist.all_reduce(values, async_op=True)

    def result() -> list[float]:
        if work is not None:
            work.wait()
        return values.tolist()  # type: ignore[no-any-return]

    return result


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return start_sum(torch.tensor(values, dtype=torch.float64, device=device))()


def row_shares(total: int, rank: int, world: int) -> list[int]:
    """This rank's rows of `total` (every world-th), padded with -1 to the same count on every rank,
    so each rank runs as many batches (and collectives) as the others."""
    mine = list(range(rank, total, world))
    return mine + [-1] * (-(-total // world) - len(mine))


def teardown(synchronise: bool) -> None:
    """Barrier, then destroy: without both, gloo runs abort at exit about one time in ten.

    After a failure the other ranks may never arrive, so there is no barrier then.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if synchronise:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- failure reports --------------------------------------------------------------------------------

ERRORS_DIR = "errors"  # under RUN/logs: one JSON file per failed rank, read by `launcher run` and job.sbatch
# A rank that fails because another one died sees only the broken connection: report it second.
SECONDARY = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def write_error_file(logs_dir: Path, rank: int, exc: BaseException) -> Path:
    """Record one rank's exception (type, first line, innermost frame) as logs/errors/rank-NNNNN.json."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    record = {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "exception": type(exc).__name__,
        "message": message,
        "where": where,
        "time": time.time(),
        "secondary": any(marker in str(exc) for marker in SECONDARY),
    }
    folder = logs_dir / ERRORS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank:05d}.json"
    from launcher.runfiles import replace_file

    replace_file(path, json.dumps(record) + "\n")
    return path


def quiet_warnings() -> None:
    """Third-party warnings (DeepSpeed's FutureWarnings, ...): one line each, each only once per rank.

    Deduplicated here rather than by a "once" filter: libraries reset the filters after import."""
    warnings.simplefilter("once")
    seen: set[tuple[str, str]] = set()

    def show_once(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
    ) -> None:
        text = (str(message).strip().splitlines() or [""])[0]
        if (category.__name__, text) in seen:
            return
        seen.add((category.__name__, text))
        print(f"warning: {category.__name__}: {text} ({Path(filename).name}:{lineno})", file=sys.stderr, flush=True)

    warnings.showwarning = show_once


def raise_for_test(step: int, rank: int, world_size: int) -> None:
    """Test hook: LAUNCHER_TEST_RAISE_AT_STEP=N makes the last rank raise after step N (and its save)."""
    if os.environ.get("LAUNCHER_TEST_RAISE_AT_STEP") == str(step) and rank == world_size - 1:
        raise RuntimeError(f"LAUNCHER_TEST_RAISE_AT_STEP={step}: test failure on rank {rank}")
