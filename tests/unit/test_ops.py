"""DeepSpeed's JIT ops are built once by the prepare step, before the ranks start (runtime/parallel/zero_ops.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan import build_plan
from launcher.runtime.parallel import zero_ops as ops

ROOT = Path(__file__).resolve().parents[2]


def _deepspeed_plan(tmp_path: Path, *overrides: str) -> dict:
    cfg = load_config(ROOT / "recipes" / "tiny-cpu-deepspeed.yaml", list(overrides))
    return build_plan(cfg, str(tmp_path / "run")).deepspeed


def test_names_are_deepspeeds_own() -> None:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(ops.CPU_ADAM[0])
    name = builder.NAME if builder is not None else None
    assert name == ops.CPU_ADAM[1]


def test_only_offload_needs_an_op(tmp_path: Path) -> None:
    assert ops.needed_ops(None) == []
    assert ops.needed_ops(_deepspeed_plan(tmp_path)) == []
    offloaded = _deepspeed_plan(tmp_path, "parallel.zero_stage=2", "parallel.offload_optimizer=cpu")
    assert ops.needed_ops(offloaded) == [ops.CPU_ADAM]


def test_built_once_then_seen_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    built: list[str] = []

    def fake_build(builder: str) -> None:  # what torch's cpp_extension leaves behind
        built.append(builder)
        name = dict([ops.CPU_ADAM])[builder]
        (tmp_path / "ext" / name).mkdir(parents=True)
        (tmp_path / "ext" / name / f"{name}.so").write_bytes(b"\x7fELF")

    monkeypatch.setattr(ops, "build_op", fake_build)
    plan = _deepspeed_plan(tmp_path, "parallel.zero_stage=2", "parallel.offload_optimizer=cpu")
    line = ops.prebuild_ops(plan)
    assert line is not None and line.startswith("launcher: built DeepSpeed's cpu_adam in ") and built == ["CPUAdamBuilder"]
    assert ops.prebuild_ops(plan) is None and built == ["CPUAdamBuilder"], "a cached build is not built again"


def test_a_failed_build_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))

    def no_compiler(builder: str) -> None:
        raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped")

    monkeypatch.setattr(ops, "build_op", no_compiler)
    line = ops.prebuild_ops(_deepspeed_plan(tmp_path, "parallel.zero_stage=2", "parallel.offload_optimizer=cpu"))
    assert line == (
        "warning: DeepSpeed's cpu_adam could not be built before the ranks start "
        "(Error building extension 'cpu_adam'); the ranks will try themselves"
    )
