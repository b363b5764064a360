"""transformers' checkpoint conversions in our per-shard loader and in export (issue 25): renamed keys
load (GPT-NeoX's embed_out is the model's lm_head) and export under the original's names; keys that
transformers merges on load (Mixture-of-Experts experts) are one clear error, not "no weight for"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _tiny(kind: str, path: Path) -> torch.nn.Module:
    import transformers

    shape = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    if kind == "mixtral":
        config = transformers.MixtralConfig(**shape, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    else:
        config = transformers.GPTNeoXConfig(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def _load(path: Path) -> torch.nn.Module:
    from launcher.config.schema import ModelSection
    from launcher.runtime.model.build import WeightMap, build_on_meta, load_weights, materialize

    model = build_on_meta(path, ModelSection(name_or_path=str(path)), "sdpa", torch.float32, "causal_lm", None)
    weights = WeightMap.of(model, "causal_lm")
    materialize(model, torch.device("cpu"))
    load_weights(model, weights, path)
    return model.eval()


def test_a_renamed_checkpoint_loads_and_exports_under_its_own_names(tmp_path: Path) -> None:
    import json

    from launcher.runtime.model.conversions import save_renamer

    original = _tiny("gpt_neox", tmp_path)
    ids = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path)(ids).logits, original(ids).logits, atol=0, rtol=0)
    save = save_renamer(json.loads((tmp_path / "config.json").read_text()))
    assert save("lm_head.weight") == "embed_out.weight" and save("gpt_neox.embed_in.weight") == "gpt_neox.embed_in.weight"
    assert save_renamer({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})("lm_head.weight") == "lm_head.weight"


def test_experts_transformers_merges_on_load_are_one_clear_error(tmp_path: Path) -> None:
    from launcher.runtime.model.build import ModelError

    _tiny("mixtral", tmp_path)
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor .*experts.* is one of several transformers merges on load"):
        _load(tmp_path)
