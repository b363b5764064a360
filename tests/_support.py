"""Helpers shared by the tests (a plain module: several conftest.py files would shadow each other)."""

from __future__ import annotations

import os
from pathlib import Path

# 20 steps of tiny-cpu.yaml under FSDP2 at 2 ranks, decay 0.1 (matrices only), a loss every step, no
# evaluation: the training of the session's shared run (conftest.py's tiny_fsdp_20). test_parity.py's
# other backends and test_deepspeed.py's ZeRO runs train the same; test_checkpoint.py's runs too, held
# to it bit for bit.
TINY_20 = [
    "train.max_steps=20",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "optim.weight_decay=0.1",
]
# The shared run's own overrides: TINY_20 with a checkpoint every 5 steps, all four kept (saving leaves
# the losses alone). test_checkpoint.py and test_faults.py resume, export and break copies of them.
TINY_FSDP_20 = [*TINY_20, "checkpoint.every=5", "checkpoint.keep_last=10"]


def launcher_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = True, plot: bool = False):
    """Run `python -m launcher ARGS` as a user would; returns the CompletedProcess. A `run` draws no
    loss.png unless `plot` (a second or more of every run's end, CI time; tests that look at it say so)."""
    import subprocess
    import sys

    if args[:1] == ("run",) and len(args) > 1 and not plot and not any(a.startswith("train.plot=") for a in args):
        args = (*args[:2], "train.plot=false", *args[2:])
    done = subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and done.returncode != 0:
        raise AssertionError(f"launcher {' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from a run's metrics.jsonl."""
    import json

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def four_bit_tiny_base():
    """The tiny model loaded 4-bit exactly as tiny-cpu-qlora.yaml trains it (NF4, double quant, bf16)."""
    from launcher.runtime.model.tiny import ensure_tiny_model

    return four_bit_base(ensure_tiny_model())


def four_bit_base(path):
    """Any model directory loaded 4-bit as the QLoRA recipes train it (NF4, double quant, bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from launcher.runtime.model.methods import keep_4bit_layout

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16)
    keep_4bit_layout(model)
    return model


def kept_bytes(model, **inputs) -> int:
    """Bytes of the storages one forward creates and leaves alive (parameters and the output's own
    storage aside): what autograd saves plus what selective checkpointing caches, which
    saved_tensors_hooks cannot see (torch.utils.checkpoint keeps those outputs itself)."""
    import gc
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Created(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.storages: list[weakref.ref] = []  # not keyed by address: a freed block's address is reused

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.storages.append(weakref.ref(tensor.untyped_storage()))  # one Python object per storage while it lives
            return out

    created = Created()
    with created:
        output = model(**inputs)
    gc.collect()
    leaves = [t for t in tree_leaves(dict(output)) if isinstance(t, torch.Tensor)]
    skip = {t.untyped_storage().data_ptr() for t in leaves} | {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = {storage.data_ptr(): storage.nbytes() for storage in (ref() for ref in created.storages) if storage is not None}
    return sum(size for ptr, size in alive.items() if ptr not in skip)
