"""Several data sets in one run: the requested proportion over a run, one global order whatever the
world size, the same cache (so the same resume point) when prepared again, and the mix reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launcher.config import load_config
from launcher.runtime.data.mixing import mix_counts, pick
from launcher.runtime.data.packing import GlobalOrder, TokenData, prepare_data
from launcher.runtime.data.report import lines
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Set a (instruction rows, 300) and set b (chat rows, 900), mixed 3:1 by weight."""
    tmp = tmp_path_factory.mktemp("mix")
    a = tmp / "a.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"copy: w{i}", "output": f"w{i}"}) + "\n" for i in range(300)))
    b = tmp / "b.jsonl"
    turns = [[{"from": "human", "value": f"say v{i}"}, {"from": "gpt", "value": f"v{i}"}] for i in range(900)]
    b.write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    datasets = f"[{{path: {a}, template: alpaca, weight: 3}}, {{path: {b}, name: chats, template: chat, weight: 1}}]"
    cfg = load_config(ROOT / "recipes" / "tiny-cpu.yaml", [f"data.datasets={datasets}", "data.val_fraction=0.05"])
    folder = prepare_data(cfg.data, cfg.data.path, ensure_tiny_model(), tmp / "cache", seed=3)
    return folder, cfg


def test_counts_follow_weights_or_samples() -> None:
    assert mix_counts([300, 900], [3, 1], [0, 0]) == [900, 300]
    assert mix_counts([300, 900], [1, 1], [50, 0]) == [50, 900]  # samples are exact; the rest by weight
    assert mix_counts([10], [5], [0]) == [10]
    chosen = pick(4, 10, np.random.default_rng(0))  # two whole passes, then half of a third
    assert sorted(np.bincount(chosen).tolist()) == [2, 2, 3, 3]


def test_three_to_one_over_a_run_and_reported(mixed: tuple[Path, Any]) -> None:
    folder, _ = mixed
    meta = json.loads((folder / "meta.json").read_text())
    a, b = meta["sources"]
    assert (a["kept"], b["kept"]) == (285, 855) and (a["mixed"], b["mixed"]) == (855, 285)  # 5 % held out of each
    assert "data: mix per epoch: a.jsonl 75.0% (855), chats 25.0% (285) documents" in lines(meta)
    train = TokenData(folder, "train")
    order = GlobalOrder(len(train), seed=3)
    steps, batch = 60, 8  # a run of 60 steps of 8 rows: about 1.4 epochs, so not a whole number of them
    seen = train.sources([order.row(k) for k in range(steps * batch)])
    assert abs(seen[0] / seen.sum() - 0.75) < 0.02, seen


def test_one_global_order_at_world_size_1_2_4(mixed: tuple[Path, Any]) -> None:
    folder, _ = mixed
    order = GlobalOrder(len(TokenData(folder, "train")), seed=3)

    def step(s: int, world: int, micro: int, accum: int) -> list[int]:
        return [r for rank in range(world) for m in order.step_rows(s, 8, rank, world, micro, accum) for r in m]

    for s in (0, 5, 40):
        assert step(s, 1, 2, 4) == step(s, 2, 2, 2) == step(s, 4, 1, 2) == step(s, 4, 2, 1)


def test_prepared_again_gives_the_same_rows(mixed: tuple[Path, Any], tmp_path: Path) -> None:
    folder, cfg = mixed
    again = prepare_data(cfg.data, cfg.data.path, ensure_tiny_model(), tmp_path / "cache", seed=3)
    assert again.name == folder.name  # the fingerprint a checkpoint records: resume accepts it
    for name in ("input_ids", "target_mask", "offsets", "label_tokens", "doc_lengths", "doc_sources"):
        assert np.array_equal(np.load(folder / "train" / f"{name}.npy"), np.load(again / "train" / f"{name}.npy")), name
