"""One tiny FSDP2 run shared by test_parity.py and test_deepspeed.py (each had trained its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

# 20 steps of tiny-cpu.yaml under FSDP2 at 2 ranks, decay 0.1 (matrices only), a loss every step, no
# evaluation, a checkpoint at steps 10 and 20 (the DeepSpeed tests export it; saving leaves the
# losses alone). test_deepspeed.py's ZeRO runs use the same overrides, test_parity.py's other
# backends the same minus the checkpoints.
TINY_FSDP_20 = [
    "train.max_steps=20",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "optim.weight_decay=0.1",
    "checkpoint.every=10",
]


@pytest.fixture(scope="session")
def tiny_fsdp_20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of TINY_FSDP_20 (one ~30 s run for the whole session)."""
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("tiny-fsdp-20") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *TINY_FSDP_20, "--out", str(run))
    return run
