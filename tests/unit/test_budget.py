"""The save budget (plan/budget.py): a signal window too short for a step plus a save is a warning
with the number that would cover it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from launcher.plan import build_plan
from launcher.plan.budget import MARGIN, save_budget_warning, save_seconds

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "llama3-8b-full-fsdp.yaml"


def _warning(tmp_path: Path, *overrides: str) -> tuple[str | None, dict[str, float]]:
    cfg = load_config(RECIPE, list(overrides))
    plan = build_plan(cfg, str(tmp_path / "run"))
    line = save_budget_warning(cfg.cluster, plan.estimate)
    assert plan.warnings == ([line] if line else []), "the plan carries the warning (the CLI prints plan.warnings)"
    return line, plan.estimate


def test_the_shipped_window_covers_a_save_at_the_assumed_speed(tmp_path: Path) -> None:
    line, estimate = _warning(tmp_path)
    assert line is None and estimate["checkpoint_bytes"] > 50e9, "an 8B full run writes weights and AdamW states"


def test_a_slow_file_system_is_a_warning_with_the_fix(tmp_path: Path) -> None:
    line, estimate = _warning(tmp_path, "cluster.fs_bandwidth_gbps=0.2", "cluster.signal_seconds=300")
    assert line is not None and line.startswith("warning: cluster.signal_seconds: 300 s may not cover a save")
    needed = (estimate["checkpoint_bytes"] / 0.2e9 + estimate["step_seconds"]) * MARGIN
    suggested = int(re.search(r"raise cluster.signal_seconds to (\d+)$", line).group(1))  # type: ignore[union-attr]
    assert needed <= suggested < needed + 60 and "0.2 GB/s per node" in line
    # more nodes write in parallel: the same file system covers it at 8 nodes
    cfg = load_config(RECIPE, ["cluster.fs_bandwidth_gbps=0.2", "cluster.nodes=8", "train.global_batch_size=512"])
    assert save_seconds(cfg.cluster, estimate["checkpoint_bytes"]) == pytest.approx(estimate["checkpoint_bytes"] / 0.2e9 / 8)


def test_assumed_speed_says_so_and_no_window_no_warning(tmp_path: Path) -> None:
    line, _ = _warning(tmp_path, "cluster.signal_seconds=30")
    assert line is not None and "an assumed 2 GB/s per node" in line and "set cluster.fs_bandwidth_gbps" in line
    assert _warning(tmp_path, "cluster.signal_seconds=0")[0] is None


@pytest.mark.parametrize("value", ["0", "-1", "1e9"])
def test_bandwidth_is_checked(value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cluster.fs_bandwidth_gbps: {float(value)} is not a write speed in GB/s")):
        load_config(RECIPE, [f"cluster.fs_bandwidth_gbps={value}"])


def test_launcher_plan_prints_the_warning(tmp_path: Path) -> None:
    import contextlib
    import io

    from launcher.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["plan", str(RECIPE), "cluster.signal_seconds=30", "--out", str(tmp_path / "run")])
    assert code == 0 and err.getvalue().startswith("warning: cluster.signal_seconds: 30 s may not cover a save"), err.getvalue()


def test_a_save_from_many_nodes_is_capped_by_the_file_systems_total() -> None:
    """issue 26: the save time assumed every node adds its own bandwidth (0.4 s at 128 nodes)."""
    from launcher.plan.estimate import estimate_plan
    from launcher.plan.estimate.cost import write_speed
    from launcher.plan.topology import build_topology

    assert write_speed(1) == 2e9 and write_speed(4) == 8e9  # 2 GB/s per node while the file system keeps up
    assert write_speed(128) == 20e9  # then the file system's total (20 GB/s assumed)
    assert write_speed(128, per_node_gbps=0.5, total_gbps=100) == 64e9 and write_speed(2, 30.0, 20.0) == 30e9
    cfg = load_config(
        ROOT / "recipes" / "llama3-70b-full-zero3-offload.yaml",
        ["cluster.nodes=16", "train.global_batch_size=128", "cluster.fs_total_gbps=10"],
    )
    estimate = estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))
    assert estimate["checkpoint_seconds"] == pytest.approx(estimate["checkpoint_bytes"] / 10e9)
    assert save_seconds(cfg.cluster, estimate["checkpoint_bytes"]) == pytest.approx(estimate["checkpoint_seconds"])
