"""One tiny FSDP2 run shared by test_parity.py and test_deepspeed.py (each had trained its own)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_fsdp_20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of _support.TINY_FSDP_20 (one ~30 s run for the whole session)."""
    from _support import TINY_FSDP_20, launcher_cli

    run = tmp_path_factory.mktemp("tiny-fsdp-20") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *TINY_FSDP_20, "--out", str(run))
    return run
