"""Asynchronous checkpoints on 2 gloo ranks with the real Saver, polled at every step while one rank's
write is held for seconds: DCP's background thread runs its own collectives (plan gather, final
gather) while the training thread polls; the two must never share a process group, or the ranks
pair different collectives and hang (issue 24). Every save finishes and reads back bit-exactly."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

# A save every EVERY steps when none is in flight, until SAVES saves have finished: at least 50 polled
# steps on a quiet machine, and the same SAVES on a loaded one. MAX_STEPS only bounds a loop that never
# finishes its saves: a step takes 2-6 ms, so one 1.5 s save spans 250-750 of them (400 let only 2 of 3
# saves finish once the steps got faster).
MAX_STEPS, EVERY, SAVES, SLOW_RANK, SLOW_SECONDS = 5000, 10, 3, 1, 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from launcher.runtime.state import checkpoint as ckpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCHER_TEST_SLOW_ASYNC_WRITE=f"{SLOW_RANK}:{SLOW_SECONDS}")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = fully_shard(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saver = ckpt.Saver(
        Path(root), rank, keep_last=10, async_save=True, group=dist.new_group(backend="gloo"), poll_group=dist.new_group(backend="gloo")
    )
    saved: dict[int, dict[str, torch.Tensor]] = {}
    polls_in_flight = 0
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, MAX_STEPS + 1):
        loss = model(torch.randn(8, 32, generator=generator)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if not saver.poll():  # what the loop does at every step boundary
            polls_in_flight += 1
        if saver.in_flight() is None and len(saved) == SAVES:  # the same on every rank: poll() agreed
            break
        if step % EVERY == 0 and saver.in_flight() is None:
            saved[step] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
            saver.save(model, optimizer, {"step": step, "world_size": world})
    saver.wait()
    # Every save that began is complete, and holds the parameters of its step, bit for bit.
    for step, expected in saved.items():
        folder = ckpt.step_dir(Path(root), step)
        assert ckpt.is_complete(folder)[0], folder
        fresh = fully_shard(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)))
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        ckpt.load(folder, fresh, fresh_optimizer, rank)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value.full_tensor(), expected[key]), (step, key)
    if rank == 0:
        Path(root, "result").write_text(f"{len(saved)} {polls_in_flight}\n")
    dist.barrier()
    dist.destroy_process_group()


def test_async_saves_polled_every_step_with_a_slow_rank_finish_and_read_back(tmp_path: Path) -> None:
    context = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + 240
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("the ranks hung: async saves and the step-boundary poll paired different collectives")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    saves, polls = map(int, (tmp_path / "result").read_text().split())
    assert saves == SAVES, saves
    assert polls >= 3, polls  # the poll ran while a save was in flight (some 200 times on a quiet machine)
