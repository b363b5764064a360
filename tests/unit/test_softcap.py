"""Attention softcapping (Gemma-2's attn_logit_softcapping) is decided at plan time (issue 24): SDPA
cannot apply it (transformers refuses to build such a model for SDPA, after the ranks started), so
`launcher plan` refuses kernels.attention=sdpa for it, and auto builds eager (or flash on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launcher.kernels.attention import attn_implementation, model_inputs

from launcher.config import ConfigError, load_config


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma2Config

    path = tmp_path_factory.mktemp("gemma2")
    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=300,
    )
    config.save_pretrained(path)
    return path


def test_sdpa_is_refused_at_plan_time_naming_the_key(gemma2: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("tiny-cpu.yaml", [f"model.name_or_path={gemma2}", "kernels.attention=sdpa"])
    message = str(caught.value)
    assert message.startswith("error: kernels.attention: sdpa cannot apply this model's attention softcapping")
    assert "attn_logit_softcapping 50" in message and "use auto" in message


def test_auto_builds_eager_for_it_and_a_packed_batch_runs(gemma2: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_config("tiny-cpu.yaml", [f"model.name_or_path={gemma2}"])
    assert cfg.model.attn_logit_softcapping == 50.0
    impl = attn_implementation(cfg.kernels.attention, "cpu", softcap=cfg.model.attn_logit_softcapping is not None)
    assert impl == "eager"
    assert attn_implementation("auto", "cpu") == "launcher_sdpa"  # a model without softcapping keeps SDPA
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gemma2), attn_implementation=impl).eval()
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]  # two documents in one row
    kwargs, _ = model_inputs(ids, ids.clone(), positions, impl)
    with torch.no_grad():
        packed = model(**kwargs).logits[0]
        alone = model(input_ids=ids[:, 10:]).logits[0]
    torch.testing.assert_close(packed[10:], alone, rtol=1e-4, atol=1e-4)  # the second document saw only itself
