"""A saved DatasetDict's own validation (else test) split is the validation set by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.runtime.data.packing import prepare_data
from launcher.runtime.data.report import lines
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("held", ["validation", "test"])
def test_a_dataset_dicts_own_split_is_used_for_validation(tmp_path: Path, held: str) -> None:
    import datasets

    train = [{"prompt": f"copy: w{i}", "response": f"w{i}"} for i in range(40)]
    val = [{"prompt": f"copy: v{i}", "response": f"v{i}"} for i in range(8)]
    path = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), held: datasets.Dataset.from_list(val)}).save_to_disk(path)
    data = load_config(ROOT / "recipes" / "tiny-cpu.yaml", [f"data.path={path}", "data.packing=false"]).data
    assert data.val_fraction > 0 and not data.val_split and not data.val_path
    folder = prepare_data(data, path, ensure_tiny_model(), tmp_path / "cache", seed=1)
    meta = json.loads((folder / "meta.json").read_text())
    (report,), (val_report,) = meta["sources"], meta["val_sources"]
    assert (report["read"], report["kept"], report["val"]) == (40, 40, 0)  # no training row held out
    assert (val_report["read"], val_report["val"]) == (8, 8)
    assert f"data: dd (its {held} split, used for validation): read 8," in "\n".join(lines(meta))
    # turned off, it stays off
    off = load_config(ROOT / "recipes" / "tiny-cpu.yaml", [f"data.path={path}", "data.packing=false", "data.val_fraction=0"]).data
    meta = json.loads((prepare_data(off, path, ensure_tiny_model(), tmp_path / "cache", seed=1) / "meta.json").read_text())
    assert meta["val_sources"] == [] and meta["sources"][0]["val"] == 0
