"""SIGUSR1 / SIGTERM → stop at the next step boundary, after a checkpoint, with the requeue code.

The handler only records the signal; the loop asks every rank at each step boundary (one small
all-reduce), so a signal that reaches only one rank still stops all of them at the same step. A
second signal while saving changes nothing.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            print(f"launcher: received {signal.Signals(signum).name}; saving at the next step boundary", file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
