"""DeepSpeed's JIT-compiled ops, built once before the ranks start.

Left to the ranks, every rank of every node compiles the same extension at start-up (one of them
under a file lock, the others waiting), inside the time a job has to reach its first step. The
prepare step (`launcher run`'s own process, or the one task job.sbatch starts before the ranks)
builds them instead, into TORCH_EXTENSIONS_DIR (the project cache by default, which the ranks read).
A build already in the cache is seen without importing torch or DeepSpeed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from launcher.runtime.model.tiny import cache_dir

# (DeepSpeed's builder class, the extension it writes): tests check these against DeepSpeed's own NAME.
CPU_ADAM = ("CPUAdamBuilder", "cpu_adam")  # the optimizer of parallel.offload_optimizer: cpu | nvme


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache_dir() / "torch_extensions")


def needed_ops(plan_deepspeed: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The ops a DeepSpeed plan makes the ranks build (none for the torch backends)."""
    if plan_deepspeed is None:
        return []
    ops = []  # (the CPU shared-memory all-reduce is turned off: engine._prepare_environment)
    offload = plan_deepspeed.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device", "none") != "none":
        ops.append(CPU_ADAM)
    return ops


def is_built(name: str) -> bool:
    return (extensions_dir() / name / f"{name}.so").is_file()


def prebuild_ops(plan_deepspeed: dict[str, Any] | None) -> str | None:
    """Build what is missing; one line saying what was built and how long it took (None: nothing to do)."""
    missing = [op for op in needed_ops(plan_deepspeed) if not is_built(op[1])]
    if not missing:
        return None
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    started = time.monotonic()
    for builder, name in missing:
        try:
            build_op(builder)
        except Exception as exc:  # no compiler, no headers: the ranks would fail the same way, with DeepSpeed's words
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return f"warning: DeepSpeed's {name} could not be built before the ranks start ({reason}); the ranks will try themselves"
    names = ", ".join(name for _, name in missing)
    return f"launcher: built DeepSpeed's {names} in {time.monotonic() - started:.1f} s, once, before the ranks start ({extensions_dir()})"


def build_op(builder: str) -> None:
    """Compile one of DeepSpeed's JIT ops for this machine's accelerator."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(builder).load(verbose=False)
