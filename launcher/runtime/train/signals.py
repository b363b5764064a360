"""SIGUSR1 / SIGTERM / SIGINT (and SIGHUP / SIGQUIT) → stop at the next step boundary, after a checkpoint, with the requeue code.

The handler only records the signal; the loop asks every rank at each step boundary (one small
all-reduce, or a place in the step's loss all-reduce on a log step: `carry`), so a signal that
reaches only one rank still stops all of them at the same step. A second USR1/TERM while saving
changes nothing (SLURM and torchrun may each pass one on). A second SIGINT is a person pressing
Ctrl-C again: stop now, without saving.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch at use only: preparing the data (stop_at_once) imports no torch
    import torch

# SIGHUP and SIGQUIT too: torchrun passes them on (plan/torchrun.py), and so does `launcher run`.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._carried: bool | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            # The next Ctrl-C takes the default action: the process ends at once, even inside a
            # collective (a Python handler would only run once the C call returned).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.signum is None:
            again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            name = signal.Signals(signum).name
            print(f"launcher: received {name}; saving at the next step boundary{again}", file=sys.stderr, flush=True)
        self.signum = signum

    def local(self) -> float:
        """This rank's flag, for a sum all-reduce that another collective makes anyway."""
        return 1.0 if self.signum is not None else 0.0

    def carry(self, ranks_signalled: float) -> None:
        """The flags' sum, reduced this step in another collective: the next `agreed` reads it."""
        self._carried = ranks_signalled > 0

    def agreed(self, device: torch.device, fresh: bool = False) -> bool:
        """True on every rank if any rank got a signal: the value carried this step, unless `fresh`
        (time has passed since, an evaluation: ask again), else one all-reduce."""
        carried, self._carried = self._carried, None
        if carried is not None and not fresh:
            return carried
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.local()], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Stopped(BaseException):
    """A stop signal where there is no step to finish and nothing to save (preparing the data).
    A BaseException: no `except Exception` on the way out may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_at_once(signums: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> Iterator[None]:
    """Inside, USR1 / TERM (what SLURM sends before the time limit or on preemption) raise Stopped at
    once; the previous handlers come back after. The data cache and the tiny model are written
    whole or not at all, so stopping loses only the work in flight; the caller exits with the
    requeue code and the next attempt prepares again. A second signal while stopping is ignored."""

    def handle(signum: int, frame: FrameType | None) -> None:
        for each in signums:
            signal.signal(each, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handle) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
