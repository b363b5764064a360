"""transformers' checkpoint conversions in our per-shard loader and in export (issue 25): renamed keys
load (GPT-NeoX's embed_out is the model's lm_head) and export under the original's names; keys that
transformers merges on load (Mixture-of-Experts experts) load merged, as from_pretrained does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _tiny(kind: str, path: Path, **extra: object) -> torch.nn.Module:
    import transformers

    shape = {**extra, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    moe = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
    configs = {
        "mixtral": lambda: transformers.MixtralConfig(**shape, **moe, num_local_experts=4),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **shape, **moe, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32
        ),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**shape, **moe, num_experts=4, moe_intermediate_size=32),
        "olmoe": lambda: transformers.OlmoeConfig(**shape, **moe, num_experts=4, eos_token_id=1, pad_token_id=0),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**shape),
        "gpt2": lambda: transformers.GPT2Config(**shape),  # a tied head
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind]()).eval()
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

    from launcher.runtime.model.conversions import SaveConversions

    original = _tiny("gpt_neox", tmp_path)
    ids = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path)(ids).logits, original(ids).logits, atol=0, rtol=0)
    save = SaveConversions(json.loads((tmp_path / "config.json").read_text())).name
    assert save("lm_head.weight") == "embed_out.weight" and save("gpt_neox.embed_in.weight") == "gpt_neox.embed_in.weight"
    assert SaveConversions({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("kind", MOE)
def test_experts_saved_per_expert_load_merged_and_save_back_as_transformers_does(kind: str, tmp_path: Path) -> None:
    """Experts as save_pretrained writes them (Mixtral: block_sparse_moe.experts.N.w1/w3/w2) into the
    model's fused experts (it was "the checkpoint has no weight for ...mlp.gate.weight"), and the
    model's tensors written back in exactly that layout, bit for bit."""
    import json

    from safetensors import safe_open

    from launcher.runtime.model.conversions import SaveConversions

    original = _tiny(kind, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        on_disk = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert any(".experts.1." in key for key in on_disk)  # the per-expert layout on disk
    ids = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path)(ids).logits, original(ids).logits, atol=0, rtol=0)
    saved = dict(SaveConversions(json.loads((tmp_path / "config.json").read_text()), original.config)(original.state_dict().items()))
    assert saved.keys() == on_disk.keys()
    assert all(torch.equal(saved[key], on_disk[key]) for key in on_disk)


def test_lora_dropout_on_fused_experts_is_refused_at_plan_time(tmp_path: Path) -> None:
    """It was peft's "lora.ParamWrapper does not work with lora_dropout != 0" on every rank, after start-up."""
    from _archs import tiny_arch
    from _support import launcher_cli

    root = Path(__file__).resolve().parents[2]
    model = f"model.name_or_path={tiny_arch('mixtral')}"
    done = launcher_cli(
        "plan", str(root / "recipes" / "tiny-cpu.yaml"), "method.name=lora", model, "--out", str(tmp_path / "a"), check=False
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: method.lora.dropout: is 0.05, but mixtral is a Mixture-of-Experts model (4 experts)" in done.stderr
    assert "set method.lora.dropout=0" in done.stderr and not (tmp_path / "a").exists()
    launcher_cli(
        "plan", str(root / "recipes" / "tiny-cpu.yaml"), "method.name=lora", "method.lora.dropout=0", model, "--out", str(tmp_path / "b")
    )
    old_names = "method.lora.target_modules=[q_proj,w1,w2]"
    recipe = str(root / "recipes" / "tiny-cpu.yaml")
    done = launcher_cli("plan", recipe, "method.name=lora", old_names, model, "--out", str(tmp_path / "c"), check=False)
    assert done.returncode == 2 and "error: method.lora.target_modules: w1, w2 name per-expert weights" in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@torch.no_grad()
def test_the_router_loss_is_in_the_training_loss_as_transformers_adds_it(kind: str, tmp_path: Path) -> None:
    """The launcher computes the loss itself (chunked CE from the head's hidden states): the router's
    load-balancing loss must not be dropped. With output_router_logits, our loss equals
    transformers' own outputs.loss (mean CE + router_aux_loss_coef x aux_loss) on the same batch."""
    from types import SimpleNamespace

    import numpy as np

    from launcher.config import load_config
    from launcher.runtime.data.packing import Batch
    from launcher.runtime.parallel.dist import DistInfo
    from launcher.runtime.train.loop import token_loss_sum

    model = _tiny(kind, tmp_path, output_router_logits=True, router_aux_loss_coef=0.5)
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids, labels=ids)
    assert reference.aux_loss is not None and reference.aux_loss > 0
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    for loss_kernel in ("plain", "chunked"):
        cfg = load_config("tiny-cpu.yaml", [f"kernels.loss={loss_kernel}"])
        ctx = SimpleNamespace(cfg=cfg, info=info, model=model, attn_implementation="sdpa", backend="single", compute_dtype=torch.float32)
        batch = Batch(ids.numpy(), ids.numpy(), np.arange(24)[None], 23, 0)
        summed, count = token_loss_sum(ctx, batch)
        assert count == 23
        torch.testing.assert_close(summed.float() / count, reference.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt_neox", "mixtral"])
@torch.no_grad()
def test_a_merged_lora_export_reads_the_base_as_transformers_does(kind: str, tmp_path: Path) -> None:
    """export --merge of a dense LoRA (no expert adapters) read the base's safetensors under their
    on-disk names: GPT-NeoX's embed_out and Mixtral's per-expert weights matched no model name and
    were left out ("1 parameters were not written, e.g. lm_head.weight"; Qwen2-MoE: "...experts.down_proj").
    Now every base tensor comes out under the model's name with the adapter merged in, and
    save_pretrained's layout is written back from them."""
    import json
    from types import SimpleNamespace

    from safetensors import safe_open

    from launcher.config.schema import LoraSection, MethodSection, ModelSection
    from launcher.runtime.model.conversions import SaveConversions
    from launcher.runtime.model.methods import merged_tensors

    original = _tiny(kind, tmp_path)
    lora = LoraSection(r=2, alpha=8, dropout=0.0)
    cfg = SimpleNamespace(model=ModelSection(name_or_path=str(tmp_path)), method=MethodSection(name="lora", lora=lora), task="causal_lm")
    module = "gpt_neox.layers.0.attention.query_key_value" if kind == "gpt_neox" else "model.layers.0.self_attn.q_proj"
    weight = original.get_submodule(module).weight
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, weight.shape[1], generator=generator), torch.randn(weight.shape[0], 2, generator=generator)
    prefix = f"model.base_model.model.{module}"  # a checkpoint's names: the training model's, under "model."
    read = {f"{prefix}.lora_A.default.weight": a, f"{prefix}.lora_B.default.weight": b}
    expected = {key: tensor.shape for key, tensor in original.state_dict().items()}
    merged = dict(merged_tensors(read, cfg, tmp_path, torch.float32, None, expected))
    assert merged.keys() == expected.keys()
    scale = 8 / 2
    torch.testing.assert_close(merged[f"{module}.weight"], weight + scale * b @ a)
    assert all(torch.equal(tensor, original.state_dict()[key]) for key, tensor in merged.items() if key != f"{module}.weight")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        on_disk = set(handle.keys())
    assert dict(SaveConversions(json.loads((tmp_path / "config.json").read_text()), original.config)(merged.items())).keys() == on_disk


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
@torch.no_grad()
def test_an_export_writes_the_tensors_save_pretrained_writes(kind: str, tmp_path: Path) -> None:
    """A model's tensors as export writes them are save_pretrained's, name for name and bit for bit:
    a tied output embedding once (a full or freeze GPT-2 / Gemma export wrote lm_head.weight beside
    the input embedding), a renamed head under the checkpoint's name (GPT-NeoX's embed_out)."""
    from safetensors import safe_open

    from launcher.runtime.state.export import save_pretrained_layout

    original = _tiny(kind, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        on_disk = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    written = dict(save_pretrained_layout(tmp_path)(original.state_dict().items()))
    assert written.keys() == on_disk.keys()
    assert all(torch.equal(written[key], on_disk[key]) for key in on_disk)
