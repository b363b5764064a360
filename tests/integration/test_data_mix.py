"""Two data sets mixed 3:1 in a real run: the mix is reported, and resume from a mid-run checkpoint
is bit-exact at the same world size and matches at another (the mixed global order is world-size free)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.runtime.state import checkpoint as ckpt

pytestmark = pytest.mark.dist

STEPS = 8
BASE = [f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_batches=0", "train.eval_exact_match=0", "optim.warmup_steps=2"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    from _support import launcher_cli

    tmp = tmp_path_factory.mktemp("mix")
    (tmp / "a.jsonl").write_text(
        "".join(json.dumps({"instruction": f"copy: w{i}", "input": "", "output": f"w{i}"}) + "\n" for i in range(200))
    )
    turns = [[{"from": "human", "value": f"say v{i}"}, {"from": "gpt", "value": f"v{i}"}] for i in range(400)]
    (tmp / "b.jsonl").write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    sets = (
        f"[{{path: {tmp / 'a.jsonl'}, template: alpaca, weight: 3}}, {{path: {tmp / 'b.jsonl'}, name: chats, template: chat, weight: 1}}]"
    )
    overrides = [*BASE, f"data.datasets={sets}", f"data.cache_dir={tmp / 'cache'}"]
    run = tmp / "straight"
    done = launcher_cli("run", "tiny-cpu.yaml", *overrides, "checkpoint.every=4", "checkpoint.keep_last=5", "--out", str(run))
    assert "data: mix per epoch: a.jsonl 75.1% (428), chats 24.9% (142) documents" in done.stdout
    assert json.loads((run / "data_report.json").read_text())["sources"][1]["name"] == "chats"
    return overrides, run


@pytest.mark.parametrize("world", [2, 1])
def test_resume_of_a_mixed_run(mix: tuple[list[str], Path], tmp_path: Path, world: int, launcher) -> None:
    overrides, straight = mix
    run = tmp_path / f"w{world}"
    source = ckpt.step_dir(straight / "checkpoints", 4)
    launcher("run", "tiny-cpu.yaml", *overrides, f"cluster.gpus_per_node={world}", f"checkpoint.resume={source}", "--out", str(run))
    reference, resumed = _losses(straight), _losses(run)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        if world == 2:
            assert loss == reference[step], step  # bit-exact
        else:
            assert loss == pytest.approx(reference[step], rel=1e-4), step
