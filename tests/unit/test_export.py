"""Export writes Hugging Face safetensors: one file, or shards with an index above a size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.runtime.model.tiny import ensure_tiny_model
from launcher.runtime.state import export


def test_large_models_are_sharded_with_an_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = ensure_tiny_model()
    tensors = load_file(base / "model.safetensors")
    monkeypatch.setattr(export, "MAX_SHARD_BYTES", 1_000_000)  # 2 MB of bf16 weights: several shards
    written = export.write_model(iter(tensors.items()), tmp_path, torch.bfloat16)
    export._copy_side_files(base, tmp_path, torch.bfloat16)
    export.verify(tmp_path, "causal_lm")
    assert written == len(tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((tmp_path / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(tensors)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert model.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tensors[name].to(torch.bfloat16)), name


def test_verify_names_a_missing_parameter(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = ensure_tiny_model()
    tensors = load_file(base / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    export.write_model(iter(tensors.items()), tmp_path, torch.float32)
    export._copy_side_files(base, tmp_path, torch.float32)
    with pytest.raises(export.ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        export.verify(tmp_path, "causal_lm")
