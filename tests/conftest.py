"""Shared test set-up: one cache for the tiny model, data and DeepSpeed JIT builds; offline HF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
os.environ.setdefault("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def launcher_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = True):
    """Run `python -m launcher ARGS` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

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


@pytest.fixture
def launcher():
    return launcher_cli


@pytest.fixture
def metrics():
    return read_metrics
