"""A Hub id already in the local Hugging Face cache: the plan reads its architecture there and writes
the snapshot directory into plan.json (model.local_dir); the ranks load from that directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan import build_plan
from launcher.runtime.model.files import model_dir

ROOT = Path(__file__).resolve().parents[2]
REPO = "acme/tiny-gpt2"


def _cache(hub: Path, weights: bool) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = hub / "models--acme--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_inner": 128}
    (snapshot / "config.json").write_text(json.dumps(config))
    if weights:
        (snapshot / "model.safetensors").write_bytes(b"{}")
    return snapshot


@pytest.mark.parametrize("weights", [True, False], ids=["complete", "config-only"])
def test_cached_hub_id_is_planned_from_its_snapshot(weights: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    snapshot = _cache(hub, weights)
    cfg = load_config(ROOT / "recipes" / "tiny-cpu.yaml", [f"model.name_or_path={REPO}", "model.layer_class="])
    assert (cfg.model.architecture, cfg.model.hidden_size, cfg.model.num_layers) == ("gpt2", 64, 2)
    plan = build_plan(cfg, str(tmp_path / "run"))
    assert plan.config["model"]["local_dir"] == str(snapshot)
    asked: list[str] = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **_: asked.append(repo_id) or str(tmp_path / "fetched"))
    if weights:
        assert model_dir(cfg.model) == snapshot and asked == []  # the directory the plan wrote; no Hub call
    else:  # only the config was cached: the weights are fetched (the job's prepare step, online)
        assert model_dir(cfg.model) == tmp_path / "fetched" and asked == [REPO]
