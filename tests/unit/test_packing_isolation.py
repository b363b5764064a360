"""Packing guard: documents packed in one row give the same loss as each run alone, and the test
would notice if attention crossed documents."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from launcher.kernels.attention import attn_implementation, document_causal_mask

from launcher.config import load_config
from launcher.runtime.data import IGNORE_INDEX, tokenize
from launcher.runtime.data.packing import Batch
from launcher.runtime.model.tiny import ensure_tiny_model, tiny_tasks
from launcher.runtime.parallel.dist import DistInfo
from launcher.runtime.train.loop import token_loss_sum

RECORDS = tiny_tasks(6, seed=11)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = load_config("tiny-cpu.yaml")
    examples = [tokenize(r, cfg.data, tokenizer) for r in RECORDS]
    attn_implementation("sdpa", "cpu")  # registers launcher_sdpa, the per-document SDPA
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.config.use_cache = False
    return cfg, model, examples


def _ctx(cfg, model, implementation: str):
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model.config._attn_implementation = implementation
    return SimpleNamespace(
        cfg=cfg, info=info, model=model, attn_implementation=implementation, backend="single", compute_dtype=torch.float32
    )


def _row(examples, packed: bool) -> Batch:
    ids = np.concatenate([e.input_ids for e in examples])[None]
    labels = np.concatenate([e.labels for e in examples])[None]
    if packed:
        positions = np.concatenate([np.arange(len(e.input_ids)) for e in examples])[None]
    else:
        positions = np.arange(ids.shape[1])[None]  # one long document: attention crosses boundaries
    return Batch(ids.astype(np.int64), labels.astype(np.int64), positions.astype(np.int64), int((labels != IGNORE_INDEX).sum()), 0)


@pytest.mark.parametrize("implementation", ["launcher_sdpa", "sdpa", "eager"])
@torch.no_grad()
def test_packed_loss_equals_one_by_one(setup, implementation: str) -> None:
    cfg, model, examples = setup
    ctx = _ctx(cfg, model, implementation)
    alone_sum, alone_tokens = 0.0, 0
    for example in examples:
        summed, n = token_loss_sum(ctx, _row([example], packed=True))
        alone_sum, alone_tokens = alone_sum + summed.item(), alone_tokens + n
    packed_sum, packed_tokens = token_loss_sum(ctx, _row(examples, packed=True))
    assert packed_tokens == alone_tokens
    assert packed_sum.item() / packed_tokens == pytest.approx(alone_sum / alone_tokens, rel=1e-5, abs=1e-5)

    # The same row without document isolation (positions run on, one causal mask): the loss differs.
    leaky_sum, leaky_tokens = token_loss_sum(ctx, _row(examples, packed=False))
    assert abs(leaky_sum.item() / leaky_tokens - alone_sum / alone_tokens) > 1e-3

    # Positions restart but the mask is plain causal (Hugging Face's failure mode with the KV cache on).
    row = _row(examples, packed=True)
    ids, positions = torch.from_numpy(row.input_ids), torch.from_numpy(row.position_ids)
    causal = document_causal_mask(torch.arange(ids.shape[1])[None], torch.float32)
    logits = model(input_ids=ids, position_ids=positions, attention_mask=causal).logits
    targets = torch.from_numpy(row.labels)[:, 1:].clone()
    targets[positions[:, 1:] == 0] = IGNORE_INDEX
    crossing = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], ignore_index=IGNORE_INDEX, reduction="sum")
    assert abs(crossing.item() / packed_tokens - alone_sum / alone_tokens) > 1e-3


def test_document_mask_blocks_other_documents() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = document_causal_mask(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
