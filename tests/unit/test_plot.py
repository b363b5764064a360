"""loss.png: drawn from metrics.jsonl by the CLI process (launcher/plot.py), loss above learning rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.plot import loss_figure, plot_after_run, plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    """Six logged steps (warmup then decay), two evaluations, as the Reporter writes them."""
    lrs = [1e-4, 2e-4, 3e-4, 2.5e-4, 1.5e-4, 0.5e-4]
    out: list[dict] = [{"step": s, "loss": 7.0 / s, "lr": lr, "grad_norm": 1.0, "tokens": 64} for s, lr in enumerate(lrs, 1)]
    out.insert(3, {"step": 3, "val_loss": 2.5, "val_ppl": 12.2})
    out.append({"step": 6, "val_loss": 1.5, "val_ppl": 4.5})
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    lines = [json.dumps(r) for r in _records()]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')  # a line cut short by a kill
    return tmp_path


def test_figure_draws_loss_and_learning_rate() -> None:
    fig = loss_figure(_records())
    loss_ax, lr_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert sorted(lines) == ["train", "validation"]
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(lines["validation"].get_xdata()) == [3, 6] and list(lines["validation"].get_ydata()) == [2.5, 1.5]
    assert loss_ax.get_yscale() == "log"
    (lr_line,) = lr_ax.get_lines()
    assert lr_line.get_label() == "learning rate"
    assert list(lr_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(lr_line.get_ydata()) == pytest.approx([1e-4, 2e-4, 3e-4, 2.5e-4, 1.5e-4, 0.5e-4])
    assert lr_ax.get_ylabel() == "learning rate" and lr_ax.get_xlabel() == "step"
    assert lr_ax.get_shared_x_axes().joined(loss_ax, lr_ax)


def test_plot_run_writes_a_png_and_skips_a_cut_line(run_dir: Path) -> None:
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")][-1] == 6  # the cut line is not a record
    path = plot_run(run_dir)
    assert path == run_dir / "loss.png"
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    assert sorted(p.name for p in run_dir.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary file left


def test_plot_off_draws_nothing_and_a_failure_is_a_warning(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert plot_after_run(run_dir, enabled=False) is None
    assert not (run_dir / "loss.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_after_run(empty, enabled=True) is None  # the run succeeded: no exception, one warning line
    err = capsys.readouterr().err
    assert err.startswith("launcher: warning: loss.png not drawn") and err.count("\n") == 1
    assert plot_after_run(run_dir, enabled=True) == run_dir / "loss.png"
    assert capsys.readouterr().out.startswith(f"launcher: plot {run_dir / 'loss.png'} (")


def test_launcher_plot_command(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "curve.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl: not found" in err[0]
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cannot write the plot" in err[0]


def test_importing_the_plot_module_loads_neither_matplotlib_nor_torch() -> None:
    code = "import sys, launcher.plot, launcher.run_local; print(sorted({'matplotlib', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
