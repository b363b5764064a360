"""GPU paths (skipped without CUDA): the tiny recipe on one GPU in bf16, FSDP2 with CPU offload,
and FlashAttention's varlen path keeping packed documents apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

GPU_TINY = [
    "cluster.accelerator=cuda",
    "cluster.gpus_per_node=1",
    "train.precision=bf16",
    "train.max_steps=20",
    "train.log_every=1",
    "train.eval_exact_match=0",
    "checkpoint.every=0",
    "checkpoint.resume=never",
]


@pytest.mark.parametrize("extra", [["parallel.backend=single"], ["parallel.fsdp.cpu_offload=true"]], ids=["single", "fsdp-offload"])
def test_tiny_recipe_on_one_gpu(extra: list[str], tmp_path: Path, launcher, metrics) -> None:
    launcher("run", "tiny-cpu.yaml", *GPU_TINY, *extra, "--out", str(tmp_path / "run"))
    train, _ = metrics(tmp_path / "run")
    assert train[-1]["loss"] < train[0]["loss"] - 1.0


def test_flash_attention_varlen_isolates_documents() -> None:
    from launcher.kernels.attention import HAS_FLASH_ATTN, attention_inputs

    if not HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed (pip install launcher[flash])")
    from transformers import AutoModelForCausalLM

    from launcher.runtime.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda().eval()
    docs = [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 33, 9)]
    with torch.no_grad():
        alone = [model(input_ids=d[None].cuda()).logits[0].float() for d in docs]
        ids = torch.cat(docs)[None].cuda()
        positions = torch.cat([torch.arange(len(d)) for d in docs])[None].cuda()
        packed = model(input_ids=ids, **attention_inputs(positions, "flash_attention_2", torch.bfloat16)).logits[0].float()
    assert torch.allclose(packed, torch.cat(alone), atol=2e-2, rtol=0)
