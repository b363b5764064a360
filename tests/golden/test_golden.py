"""Generated artifacts of every shipped recipe equal the stored files in tests/golden/<recipe>/.

Regenerate after an intended change with `LAUNCHER_UPDATE_GOLDEN=1 pytest tests/golden` and review
the diff. Plans are built for a fixed run directory and interpreter so the files are portable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from launcher.plan import build_plan, render_files
from launcher.plan.torchrun import shell_join

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
UPDATE = os.environ.get("LAUNCHER_UPDATE_GOLDEN") == "1"


def artifacts(recipe: Path) -> dict[str, str]:
    cfg = load_config(recipe)
    plan = build_plan(cfg, f"/scratch/runs/{cfg.run.name}", python="/opt/venv/bin/python")
    files = render_files(plan)
    out = {name: files[name] for name in ("deepspeed.json", "fsdp.json", "launch.sh", "job.sbatch") if name in files}
    out["torchrun.txt"] = shell_join(plan.torchrun) + "\n"
    return out


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_artifacts_match_golden(recipe: Path) -> None:
    folder = GOLDEN / recipe.stem
    produced = artifacts(recipe)
    if UPDATE:
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, text in produced.items():
            (folder / name).write_text(text)
    stored = {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}
    assert sorted(stored) == sorted(produced), f"golden files for {recipe.stem} missing; run with LAUNCHER_UPDATE_GOLDEN=1"
    for name, text in produced.items():
        assert text == stored[name], f"{recipe.stem}/{name} differs from the golden file; review, then LAUNCHER_UPDATE_GOLDEN=1"


def test_no_auto_left_in_deepspeed_configs() -> None:
    for recipe in SHIPPED:
        text = artifacts(recipe).get("deepspeed.json", "")
        assert '"auto"' not in text


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_a_planned_config_reads_back_equal_without_being_validated_again(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank builds plan.json's config straight from the dict when its digest is unchanged
    (launcher/config/resolved.py): the same RunConfig as the full validation gives."""
    import dataclasses
    import json

    from launcher.config import config_from_dict
    from launcher.config.resolved import digest
    from launcher.plan import Plan

    cfg = load_config(recipe)
    back = Plan.from_json(build_plan(cfg, f"/scratch/runs/{cfg.run.name}", python="/opt/venv/bin/python").to_json())
    assert back.config_digest == digest(back.config)
    with monkeypatch.context() as patched:
        patched.setattr("launcher.config.load.config_from_dict", lambda *a, **k: pytest.fail("validated again"))
        fast = back.run_config
    assert fast == config_from_dict(back.config, user_written=False)
    assert fast.train is not back.run_config.train  # a new object each time, like the validation's
    # Edited by hand: the digest no longer matches, so the full validation runs and refuses it.
    edited = json.loads(json.dumps(back.config))
    edited["optim"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        _ = dataclasses.replace(back, config=edited).run_config
    # Planned by another launcher version: validated in full (and this one is still valid).
    assert dataclasses.replace(back, launcher_version="0.0.0").run_config == fast
