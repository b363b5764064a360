"""The stop flag's agreement: a value carried by the step's loss all-reduce is used once, then the
boundary asks every rank again (tests/integration/test_signals.py runs the whole path on 2 ranks)."""

from __future__ import annotations

import signal

import pytest
import torch

from launcher.runtime.train.signals import StopFlag


def test_a_carried_flag_is_read_once_without_a_collective() -> None:
    stop = StopFlag()
    assert stop.local() == 0.0
    stop.signum = signal.SIGUSR1  # what the handler records
    assert stop.local() == 1.0
    stop.carry(1.0)  # another rank's or this one's signal, summed in the loss all-reduce
    assert stop.agreed(torch.device("cpu")) is True  # no process group exists: no collective ran
    stop.carry(0.0)
    assert stop.agreed(torch.device("cpu")) is False
    with pytest.raises((RuntimeError, ValueError)):  # nothing carried any more: it asks the ranks
        stop.agreed(torch.device("cpu"))
    stop.carry(0.0)
    with pytest.raises((RuntimeError, ValueError)):  # after an evaluation the carried value is stale
        stop.agreed(torch.device("cpu"), fresh=True)
