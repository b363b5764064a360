"""Shared test set-up: one cache for the tiny model, data and DeepSpeed JIT builds; offline HF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _support import launcher_cli, read_metrics

from launcher.plan.network import CPU_ENV_DEFAULTS  # no torch: the config schema only

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
os.environ.setdefault("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch is imported here: the in-process tests' OpenMP threads spin no longer at a barrier than
# the ranks' do (the plan's CPU defaults), so a busy machine does not stall them.
for _name, _value in CPU_ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def launcher():
    return launcher_cli


@pytest.fixture
def metrics():
    return read_metrics


def export_here(*args: str) -> None:
    """`launcher export ARGS` in the test's own process: the same main(), without a Python, torch and
    transformers start of its own (about 11 s each on 2 CPUs, CI time). test_archs.py exports once
    through `python -m launcher export`, as a user does."""
    import contextlib
    import io
    import warnings

    from launcher.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # DCP read without a process group: expected
        code = main(["export", *args])
    assert code == 0, f"launcher export {' '.join(args)} exited {code}\n{stderr.getvalue()[-4000:]}"


@pytest.fixture
def export():
    return export_here


@pytest.fixture(scope="session")
def tiny_fsdp_20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of _support.TINY_FSDP_20, trained once for the session and never written to:
    the FSDP2 reference of test_parity.py and test_deepspeed.py, the straight run test_checkpoint.py
    resumes against, the checkpoints test_faults.py corrupts (in copies). Each had trained its own
    (about 25 s each in CI). Its loss.png is drawn, as by default (test_checkpoint.py looks at it)."""
    from _support import TINY_FSDP_20

    run = tmp_path_factory.mktemp("tiny-fsdp-20") / "run"
    launcher_cli("run", "tiny-cpu.yaml", *TINY_FSDP_20, "--out", str(run), plot=True)
    return run
