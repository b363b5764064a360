"""`python -m launcher.agent ARGS`: torchrun (torch.distributed.run) itself, with the same arguments
and behaviour, minus the interpreter's teardown once it has finished: with torch loaded that costs
1-2 s at every run's end (measured on 2 CPUs), after the ranks have exited and everything is written.
A failure (an exception out of torchrun, e.g. a rank failed or a signal) leaves as torchrun leaves."""

from __future__ import annotations

import os
import sys


def main() -> None:
    from torch.distributed.run import main as torchrun

    from launcher.versions import torchrun_flags_missing

    missing = torchrun_flags_missing(sys.argv[1:])
    if missing:  # one line per node, before any rank starts (argparse would print its usage, then fail)
        import socket

        import torch

        print(
            f"error: torch {torch.__version__} on {socket.gethostname()} ({sys.executable}): its torchrun has no "
            f"{', '.join(missing)}, which this plan uses; install the torch the run was planned with (plan.json's versions) "
            "on every node",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)
    try:
        torchrun()
        code = 0
    except SystemExit as exc:  # argparse and torchrun's own exits
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
