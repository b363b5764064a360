"""DeepSpeed ZeRO 1/2/3 on 2 CPU ranks (gloo): runs, agrees with FSDP2, resumes exactly, exports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _support import TINY_20

from launcher.runtime.state import checkpoint as ckpt

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.dist

STEPS = 20
# The training of the FSDP2 run the ZeRO runs are held to (conftest.py's tiny_fsdp_20, the session's);
# ZeRO-3 saves at steps 10 and 20 (the resume tests start from step 10).
COMMON = [*TINY_20, "checkpoint.every=10"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def fsdp_run(tiny_fsdp_20: Path) -> Path:
    return tiny_fsdp_20


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    from _support import launcher_cli

    run = tmp_path_factory.mktemp("zero3") / "run"
    launcher_cli("run", "tiny-cpu-deepspeed.yaml", *COMMON, "--out", str(run))
    return run


def test_zero3_matches_fsdp2(fsdp_run: Path, zero3_run: Path) -> None:
    fsdp, zero3 = _losses(fsdp_run), _losses(zero3_run)
    config = [json.loads((run / "plan.json").read_text())["config"] for run in (fsdp_run, zero3_run)]
    assert config[0]["optim"] == config[1]["optim"]  # the shared FSDP2 run was trained as this one (schedule, decay)
    assert sorted(zero3) == list(range(1, STEPS + 1))
    # Same data, batch, seed, schedule and fp32 master weights; only reduction order differs.
    for step in fsdp:
        assert zero3[step] == pytest.approx(fsdp[step], rel=1e-3), step
    optimizer = json.loads((zero3_run / "deepspeed.json").read_text())["optimizer"]["params"]
    assert optimizer["weight_decay"] == 0.1  # the groups' own 0.0 for 1-D parameters overrides it


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_train(stage: int, tmp_path: Path, fsdp_run: Path, launcher) -> None:
    run = tmp_path / "run"
    launcher("run", "tiny-cpu-deepspeed.yaml", *COMMON, f"parallel.zero_stage={stage}", "checkpoint.every=0", "--out", str(run))
    losses, fsdp = _losses(run), _losses(fsdp_run)
    assert losses[STEPS] < losses[1] - 1.0
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in fsdp:  # every step, as ZeRO-3 above
        assert losses[step] == pytest.approx(fsdp[step], rel=1e-3), step


def test_deepspeed_resume_is_exact(zero3_run: Path, tmp_path: Path, launcher) -> None:
    source = ckpt.step_dir(zero3_run / "checkpoints", 10)
    assert ckpt.is_complete(source)[0] and (source / "deepspeed").is_dir()
    # The save's own time (what cluster.signal_seconds must cover), not the seconds since boot.
    assert 0 < ckpt.read_manifest(source)["save_seconds"] < 60
    run = tmp_path / "resumed"
    done = launcher("run", "tiny-cpu-deepspeed.yaml", *COMMON, f"checkpoint.resume={source}", "--out", str(run))
    assert "at step 10" in done.stdout
    reference, resumed = _losses(zero3_run), _losses(run)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), step


def test_deepspeed_resume_at_other_world_size_says_how(zero3_run: Path, tmp_path: Path, launcher) -> None:
    source = ckpt.step_dir(zero3_run / "checkpoints", 10)
    done = launcher(
        "run",
        "tiny-cpu-deepspeed.yaml",
        *COMMON,
        "cluster.gpus_per_node=1",
        f"checkpoint.resume={source}",
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert done.returncode == 2
    assert "ds_to_universal" in done.stderr and "world size 2" in done.stderr


def test_deepspeed_export_loads_and_matches_fsdp(zero3_run: Path, fsdp_run: Path, tmp_path: Path, export) -> None:
    from transformers import AutoModelForCausalLM

    export(str(zero3_run), "--out", str(tmp_path / "ds"))
    export(str(fsdp_run), "--out", str(tmp_path / "fsdp"))
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    fsdp = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["LAUNCHER_CACHE_DIR"]) / "tiny-llama-v2").eval()
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ds(ids).logits, fsdp(ids).logits, base(ids).logits
    assert (a - b).abs().max() < 1e-2 * (a - c).abs().max()  # same training, far from the untrained base
