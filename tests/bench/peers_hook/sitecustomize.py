"""bench_peers.py's probe inside every Python process of a run, for both tools alike. Not a test.

bench_peers puts this folder first on PYTHONPATH, so each interpreter of the run (the command, an
agent, a pre-importing parent, the workers) imports it at start-up. It imports no torch: it waits in
`sys.meta_path` until something imports `torch.nn.modules.sparse`, then patches
`torch.nn.Embedding.forward` in that process. A worker forked from a parent that imported torch
inherits the patched class. Each forward of an embedding in training mode appends one line to
`$BENCH_PEERS_PROBE/forwards-<pid>.jsonl`: [wall clock at the call, RANK at the call, tokens that are
not $BENCH_PEERS_PAD_ID, all tokens]. RANK is read at call time, so a fork that sets it later counts.
The first forward also registers torch's global optimizer post-step hook, which stamps the end of
that process's first optimizer step ("step": [wall clock, RANK]).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from typing import Any

TARGET = "torch.nn.modules.sparse"
_state: dict[str, Any] = {"file": None, "pid": None, "stepped": False}


def _write(record: list[Any] | dict[str, Any]) -> None:
    folder = os.environ.get("BENCH_PEERS_PROBE")
    if not folder:
        return
    if _state["pid"] != os.getpid():  # a forked child writes its own file
        _state["file"] = open(os.path.join(folder, f"forwards-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
        _state["pid"], _state["stepped"] = os.getpid(), False
        _on_first_forward()
    _state["file"].write(json.dumps(record) + "\n")  # line-buffered: a rank that leaves by os._exit loses nothing


def _on_first_forward() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def stepped(*_: Any) -> None:
        if not _state["stepped"] and _state["pid"] == os.getpid():
            _state["stepped"] = True
            _state["file"].write(json.dumps({"step": [time.time(), os.environ.get("RANK", "0")]}) + "\n")

    if not _state.get("registered"):  # once per process tree: a fork inherits the registration
        register_optimizer_step_post_hook(stepped)
        _state["registered"] = True


def _patch(module: Any) -> None:
    embedding = module.Embedding
    original = embedding.forward
    if getattr(original, "_bench_peers", False):
        return
    pad = int(os.environ.get("BENCH_PEERS_PAD_ID", "0"))

    def forward(self: Any, input: Any) -> Any:
        if self.training:
            now = time.time()
            _write([now, os.environ.get("RANK", "0"), int((input != pad).sum()), int(input.numel())])
        return original(self, input)

    forward._bench_peers = True  # type: ignore[attr-defined]
    embedding.forward = forward


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when TARGET is imported, wraps its loader to patch it once executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, execute = spec.loader, spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("BENCH_PEERS_PROBE"):
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _Finder())
