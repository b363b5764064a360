"""Process group, device, seeds and teardown: the only place that initialises torch.distributed."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

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


def init_distributed(accelerator: str) -> DistInfo:
    """Join the job's process group (gloo on CPU, nccl on CUDA) from torchrun's environment."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.accelerator is cuda but this machine has no CUDA device; use cluster.accelerator=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m launcher.runtime`: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
