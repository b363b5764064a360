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


@pytest.mark.parametrize(
    "extra",
    [["parallel.backend=fsdp"], ["parallel.backend=fsdp", "parallel.fsdp.cpu_offload=true"]],
    ids=["fsdp", "fsdp-offload"],
)
def test_qlora_on_one_gpu(extra: list[str], tmp_path: Path, launcher, metrics) -> None:
    """QLoRA's bf16-stored 4-bit base under FSDP2 (param_dtype bf16: the only accepted pair with bf16
    training), and with the base offloaded to the host (Answer.AI's 70B-on-two-24-GB-GPUs set-up)."""
    launcher("run", "tiny-cpu-qlora.yaml", *GPU_TINY, *extra, "--out", str(tmp_path / "run"))
    train, _ = metrics(tmp_path / "run")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@pytest.mark.parametrize("implementation", ["flash_attention_2", "launcher_varlen", "launcher_sdpa"])
def test_varlen_isolates_documents_on_cuda(implementation: str, micro_batch: int) -> None:
    """The packing contract on the real kernels: packed logits equal each document run alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from launcher.kernels.attention import attn_implementation, has_flash_attn, in_token_order, model_inputs

    if implementation == "flash_attention_2" and not has_flash_attn():
        pytest.skip("flash-attn is not installed (pip install launcher[flash])")
    attn_implementation("sdpa", "cuda")  # registers launcher_sdpa
    from launcher.kernels import varlen

    if implementation == "launcher_varlen" and not varlen.available():
        pytest.skip("torch's varlen FlashAttention kernel needs torch >= 2.10 and an sm80+ GPU")
    varlen.register()
    from transformers import AutoModelForCausalLM

    from launcher.runtime.model.tiny import ensure_tiny_model

    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), attn_implementation=implementation, dtype=torch.bfloat16)
    model = model.cuda().eval()
    width, rows = 64, [[17, 33, 9], [40, 5], [64], [3, 20, 30]][:micro_batch]
    gen = torch.Generator().manual_seed(micro_batch)
    docs = [[torch.randint(3, 500, (n,), generator=gen) for n in row] for row in rows]
    ids = torch.zeros(micro_batch, width, dtype=torch.long)
    labels = torch.full((micro_batch, width), -100)
    positions = torch.arange(width).repeat(micro_batch, 1)
    for i, row in enumerate(docs):
        tokens = torch.cat(row)
        ids[i, : len(tokens)], labels[i, : len(tokens)] = tokens, tokens
        positions[i, : len(tokens)] = torch.cat([torch.arange(len(d)) for d in row])
        positions[i, len(tokens) :] = torch.arange(width - len(tokens))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=d[None].cuda()).logits[0].float() for row in docs for d in row])
        kwargs, _ = model_inputs(ids, labels, positions, implementation, device=torch.device("cuda"))
        packed = in_token_order(kwargs, model(**kwargs).logits[0].float())  # launcher_sdpa sorts the documents by length
    assert packed.shape == alone.shape
    assert (packed - alone).abs().max().item() < 2e-2  # bf16 kernels: tile order differs from the one-document run
