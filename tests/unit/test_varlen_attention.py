"""The packing contract, proven on CPU: a packed micro-batch gives every document the logits it gets
alone, on the FlashAttention path (through a reference varlen attention registered in its place),
on our per-document SDPA and on the eager mask path, at micro-batch 1, 2 and 4, for several
architectures. The reference refuses what FlashAttention would silently get wrong (batch > 1, no
cu_seqlens), so the test fails if the flattening or the cu_seqlens step is removed."""

from __future__ import annotations

import pytest
import torch
from launcher.kernels import sdpa_varlen, varlen
from launcher.kernels.attention import (
    IGNORE_INDEX,
    attn_implementation,
    generation_inputs,
    in_token_order,
    model_inputs,
    next_token_targets,
    padding_computed,
)
from transformers import AttentionInterface, AutoModelForCausalLM

VOCAB, WIDTH = 97, 24
# Per micro-batch size, the documents of each row (the rest of a row is padding).
ROWS = {1: [[5, 9, 3, 4]], 2: [[5, 9, 3], [12, 4, 1]], 4: [[5, 9, 3], [12, 4], [20], [2, 2, 2, 6, 1]]}


def _configs() -> dict[str, object]:
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    small = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    gqa = {**small, "num_attention_heads": 4, "num_key_value_heads": 2}
    return {
        "llama": LlamaConfig(**gqa),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        "qwen2": Qwen2Config(**gqa),
        "mistral": MistralConfig(**gqa, sliding_window=6),  # windows shorter than the documents
        "gemma": GemmaConfig(**gqa, head_dim=8),
    }


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    attn_implementation("sdpa", "cpu")  # registers launcher_sdpa
    varlen.register()  # launcher_varlen: torch's varlen kernel (CUDA), served here by a reference kernel
    torch.manual_seed(0)
    return {name: AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval() for name, cfg in _configs().items()}


def packed_batch(rows: list[list[int]], seed: int = 0) -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents, and the [B, WIDTH] ids / labels / positions the data pipeline would give."""
    gen = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(1, VOCAB, (n,), generator=gen) for n in row] for row in rows]
    ids = torch.zeros(len(rows), WIDTH, dtype=torch.long)
    labels = torch.full((len(rows), WIDTH), IGNORE_INDEX)
    positions = torch.arange(WIDTH).repeat(len(rows), 1)  # padding: a document of its own
    for i, row in enumerate(docs):
        tokens = torch.cat(row)
        n = len(tokens)
        ids[i, :n], labels[i, :n] = tokens, tokens
        labels[i, :1] = IGNORE_INDEX  # a prompt token: no label
        positions[i, :n] = torch.cat([torch.arange(len(d)) for d in row])
        positions[i, n:] = torch.arange(WIDTH - n)
    return docs, ids, labels, positions


def reference_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Per-document causal attention computed naively from the cu_seqlens it is given."""
    cu, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if query.shape[0] != 1:
        raise AssertionError(f"varlen attention got batch {query.shape[0]}: the micro-batch was not flattened")
    if cu is None or cu_k is None or kwargs.get("max_length_q") is None:
        raise AssertionError("varlen attention got no cu_seq_lens: documents would attend to each other")
    assert attention_mask is None and torch.equal(cu, cu_k) and cu[-1] == query.shape[2]
    assert kwargs["max_length_q"] == int(cu.diff().max())
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.empty_like(query)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q = query[0, :, a:b]
        k = key[0, :, a:b].repeat_interleave(groups, 0)
        v = value[0, :, a:b].repeat_interleave(groups, 0)
        scores = (q @ k.transpose(-1, -2)) * scale
        allowed = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        if kwargs.get("sliding_window") is not None:  # Mistral: keys within the window only
            allowed &= ~torch.ones(b - a, b - a, dtype=torch.bool).tril(-kwargs["sliding_window"])
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[0, :, a:b] = scores.softmax(-1) @ v
    return out.transpose(1, 2), None


@pytest.fixture
def flash_reference(monkeypatch):
    """FlashAttention's name, served by the reference: the launcher's flash path runs end to end."""
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", reference_varlen)


KERNEL_CALLS: list[int] = []


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, **_):
    """torch.nn.attention.varlen.varlen_attn's contract, computed naively per document: [T, heads,
    dim] in and out, int32 cu_seqlens over the row, (left, right) window, K/V heads as they are."""
    assert q.dim() == 3 and q.shape[0] == int(cu_q[-1]) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int(cu_q.diff().max())
    assert enable_gqa == (q.shape[1] != k.shape[1])  # grouped K/V heads passed as they are, never repeated
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)  # the kernel takes one dtype
    KERNEL_CALLS.append(q.shape[0])
    groups, left, right = q.shape[1] // k.shape[1], window_size[0], window_size[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qi = q[a:b].transpose(0, 1)
        ki, vi = (x[a:b].transpose(0, 1).repeat_interleave(groups, 0) for x in (k, v))
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None]
        allowed = torch.ones(b - a, b - a, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        scores = ((qi @ ki.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vi).transpose(0, 1)
    return out


@pytest.fixture
def varlen_kernel(monkeypatch):
    """launcher_varlen's kernel is CUDA-only: the reference above stands in for it."""
    KERNEL_CALLS.clear()
    monkeypatch.setattr(varlen, "kernel", lambda: reference_varlen_kernel)


def _learning(docs) -> list[torch.Tensor]:
    """The documents that predict something (a one-token document has no next token: dropped)."""
    return [d for row in docs for d in row if len(d) > 1]


def _alone(model, docs) -> torch.Tensor:
    model.config._attn_implementation = "eager"
    return torch.cat([model(input_ids=d[None]).logits[0] for d in _learning(docs)])


def _packed(model, implementation: str, docs, ids, labels, positions) -> tuple[torch.Tensor, torch.Tensor]:
    model.config._attn_implementation = implementation
    kwargs, targets = model_inputs(ids, labels, positions, implementation)
    logits = in_token_order(kwargs, model(**kwargs).logits.reshape(-1, VOCAB))
    targets = in_token_order(kwargs, targets)
    if implementation == "eager":  # rows as they are: keep the tokens of the learning documents
        keep = [
            torch.cat([torch.full((len(d),), len(d) > 1) for d in row] + [torch.zeros(WIDTH - sum(map(len, row)), dtype=torch.bool)])
            for row in docs
        ]
        logits, targets = logits[torch.cat(keep)], targets[torch.cat(keep)]
    return logits, targets


IMPLEMENTATIONS = ["flash_attention_2", "launcher_varlen", "launcher_sdpa", "sdpa", "eager"]


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gemma"])
@torch.no_grad()
def test_packed_logits_equal_documents_alone(
    models, flash_reference, varlen_kernel, arch: str, implementation: str, micro_batch: int
) -> None:
    model = models[arch]
    docs, ids, labels, positions = packed_batch(ROWS[micro_batch], seed=micro_batch)
    alone = _alone(model, docs)
    logits, targets = _packed(model, implementation, docs, ids, labels, positions)
    assert logits.shape == alone.shape
    assert (logits - alone).abs().max().item() <= 1e-5
    # Targets: the next token of the same document; a document's last token predicts nothing.
    expected = torch.cat([torch.cat([d[1:], torch.tensor([IGNORE_INDEX])]) for d in _learning(docs)])
    assert torch.equal(targets, expected)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@torch.no_grad()
def test_generation_forward_gives_each_sequence_its_own_next_token_logits(
    models, flash_reference, varlen_kernel, arch: str, implementation: str, keep: bool
) -> None:
    """The evaluation's batched greedy step (runtime/train/tasks.py): one forward over sequences of
    different lengths (10 and 11 share launcher_sdpa's bucket, so one is padded) gives each the logits
    of its last token that it gets alone, with the head on those tokens only (`logits_to_keep`) or
    on every position."""
    model = models[arch]
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (10, 3, 12, 11, 1)]
    model.config._attn_implementation = "eager"
    alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])
    model.config._attn_implementation = implementation
    kwargs, last = generation_inputs(sequences, implementation, keep_logits=keep)
    logits = model(**kwargs).logits
    if keep:  # the head ran on the last tokens alone: one row of them, or one per padded row (eager)
        assert logits.shape == ((len(sequences), 1, VOCAB) if implementation == "eager" else (1, len(sequences), VOCAB))
    elif implementation == "launcher_sdpa":
        assert logits.shape[1] > sum(map(len, sequences))  # the bucket's padding is among the slots
    picked = logits.reshape(-1, VOCAB)[last]
    assert (picked - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_generation_rows_for_prompt_tuning_take_the_last_positions(models) -> None:
    """flatten=False (peft prompt tuning prepends virtual tokens): rows padded at their ends, and the
    index counts positions within the rows, so the caller keeps the last `width` of each."""
    model = models["llama"]
    model.config._attn_implementation = "sdpa"
    sequences = [[5, 6, 7, 8], [9, 10]]
    kwargs, last = generation_inputs(sequences, "sdpa", flatten=False, keep_logits=False)
    assert set(kwargs) == {"input_ids"} and kwargs["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert last.tolist() == [3, 5]
    picked = model(**kwargs).logits.reshape(-1, VOCAB)[last]
    alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])
    assert (picked - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@torch.no_grad()
def test_flash_path_fails_without_flattening_or_cu_seqlens(models, flash_reference, micro_batch: int) -> None:
    model = models["llama"]
    docs, ids, labels, positions = packed_batch(ROWS[micro_batch], seed=micro_batch)
    model.config._attn_implementation = "flash_attention_2"
    # The old contract (rows with position ids, no cu_seqlens): refused at any micro-batch size.
    with pytest.raises(AssertionError, match=r"not flattened|no cu_seq_lens"):
        model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
    # Flattened, but cu_seqlens saying "one document": attention crosses documents, logits differ.
    kwargs, _ = model_inputs(ids, labels, positions, "flash_attention_2")
    whole = torch.tensor([0, kwargs["input_ids"].shape[1]], dtype=torch.int32)
    kwargs.update(cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=int(whole[1]), max_length_k=int(whole[1]))
    leaky = model(**kwargs).logits[0]
    assert (leaky - _alone(model, docs)).abs().max().item() > 1e-3


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_torch_varlen_is_one_kernel_call_per_layer(models, varlen_kernel, micro_batch: int) -> None:
    """launcher_varlen (CUDA without flash-attn): the whole packed micro-batch in one kernel call per
    layer, whatever its documents' lengths (launcher_sdpa needs a call per distinct length), and its
    gradients equal the eager mask path's."""
    model = models["mistral"]  # grouped K/V heads and a sliding window
    docs, ids, labels, positions = packed_batch(ROWS[micro_batch], seed=micro_batch)
    grads = {}
    for implementation in ("launcher_varlen", "eager"):
        KERNEL_CALLS.clear()
        model.zero_grad()
        logits, targets = _packed(model, implementation, docs, ids, labels, positions)
        torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        grads[implementation] = [p.grad.clone() for p in model.parameters()]
        if implementation == "launcher_varlen":
            assert len(KERNEL_CALLS) == model.config.num_hidden_layers, KERNEL_CALLS
            assert len({len(d) for row in docs for d in row if len(d) > 1}) > 1  # several lengths, still one call
    model.zero_grad()
    for a, b in zip(grads["launcher_varlen"], grads["eager"], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_auto_takes_torch_varlen_on_cuda_without_flash_attn(monkeypatch) -> None:
    from launcher.kernels import attention

    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: True)
    monkeypatch.setattr(attention, "ampere_or_newer", lambda: True)
    assert attention.attn_implementation("auto", "cuda") == "launcher_varlen"
    assert attention.attn_implementation("sdpa", "cuda") == "launcher_sdpa"  # asked for by name
    assert attention.attn_implementation("auto", "cuda", softcap=True) == "eager"  # Gemma-2: SDPA and this kernel cannot cap
    monkeypatch.setattr(attention, "ampere_or_newer", lambda: True)
    assert attention.attn_implementation("auto", "cuda", half=False) == "launcher_sdpa"  # fp32: no FlashAttention kernel takes it
    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    monkeypatch.setattr(attention, "ampere_or_newer", lambda: False)  # flash-attn installed on a V100 / T4 node
    assert attention.attn_implementation("auto", "cuda") == "launcher_sdpa"
    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    monkeypatch.setattr(attention, "ampere_or_newer", lambda: True)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: False)  # an older torch
    assert attention.attn_implementation("auto", "cuda") == "launcher_sdpa"
    assert varlen.window(True, None) == (-1, 0) and varlen.window(True, 6) == (5, 0) and varlen.window(False, None) == (-1, -1)


def test_torch_varlen_gets_one_dtype_under_autocast(models, varlen_kernel) -> None:
    """fp32 weights under bf16 autocast: the projections come out bf16 but the rotary tables (fp32)
    promote q and k back to fp32; the kernel (no autocast rule of its own) must get one dtype."""
    model = models["llama"]
    _, ids, labels, positions = packed_batch(ROWS[2])
    model.config._attn_implementation = "launcher_varlen"
    kwargs, _ = model_inputs(ids, labels, positions, "launcher_varlen")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**kwargs).logits
    assert len(KERNEL_CALLS) == model.config.num_hidden_layers and torch.isfinite(logits).all()


def test_sdpa_varlen_gradients_equal_reference(models) -> None:
    """Training runs through the regrouped SDPA: its gradients equal the eager mask path's."""
    model = models["qwen2"]
    docs, ids, labels, positions = packed_batch(ROWS[4], seed=3)
    grads = {}
    for implementation in ("launcher_sdpa", "eager"):
        model.zero_grad()
        logits, targets = _packed(model, implementation, docs, ids, labels, positions)
        torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        grads[implementation] = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for a, b in zip(grads["launcher_sdpa"], grads["eager"], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_sdpa_varlen_attends_per_document(models, monkeypatch) -> None:
    """No [T, T] block: each layer's SDPA calls cover the row's slots once, none longer than the
    longest document, without a mask (causal attention alone keeps documents and padding apart)."""
    calls: list[tuple[tuple[int, ...], bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask is None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa_varlen.F, "scaled_dot_product_attention", spy)
    _, ids, labels, positions = packed_batch(ROWS[4])
    model = models["llama"]
    model.config._attn_implementation = "launcher_sdpa"
    kwargs, _ = model_inputs(ids, labels, positions, "launcher_sdpa")
    model(**kwargs)
    longest = max(n for row in ROWS[4] for n in row)
    assert calls and all(shape[2] <= longest and no_mask for shape, no_mask in calls)
    assert sum(shape[0] * shape[2] for shape, _ in calls) == 2 * kwargs["input_ids"].shape[1]  # 2 layers


@pytest.mark.parametrize("cpu_factor", [sdpa_varlen.PAD_FACTOR["cpu"], 1.25])
def test_layout_bounds_padding_and_keeps_every_token(monkeypatch, cpu_factor: float) -> None:
    monkeypatch.setitem(sdpa_varlen.PAD_FACTOR, "cpu", cpu_factor)
    lengths = [300] + [10] * 50 + [40, 70, 150, 12, 9, 145, 38]
    for device_type, factor in (("cpu", cpu_factor), ("cuda", 1.0)):
        layout = sdpa_varlen.lay_out(lengths, device_type)
        padded = sum(count * length for count, length in layout.runs) - sum(lengths)
        assert padded == sdpa_varlen.padded_slots(lengths, device_type) and (padded > 0) == (device_type == "cpu")
        assert sum(count * length for count, length in layout.runs) == len(layout.source)
        assert sorted(layout.real) == sorted(lengths) and all(n <= max(lengths) for n in layout.lengths)
        assert all(length < factor * real or length == real for length, real in zip(layout.lengths, layout.real, strict=True))
        tokens = layout.source[layout.source >= 0]
        assert torch.equal(tokens.sort().values, torch.arange(sum(lengths)))  # each token once
        placed = layout.place(torch.arange(sum(lengths)), -1)
        assert torch.equal(placed, layout.source)
        positions = layout.place_positions(torch.cat([torch.arange(n) for n in lengths]))
        assert torch.equal(positions, torch.cat([torch.arange(n) for n in layout.lengths]))  # padding continues its document
    assert len(sdpa_varlen.lay_out(lengths, "cuda").source) == sum(lengths)  # nothing padded there
    assert sdpa_varlen.lay_out([7, 7, 3], "cpu").source is None  # already sorted and unpadded: the row as it is


def test_padding_documents_are_dropped(monkeypatch) -> None:
    monkeypatch.setitem(sdpa_varlen.PAD_FACTOR, "cpu", 1.25)  # a factor that pads this batch
    _, ids, labels, positions = packed_batch(ROWS[2])
    kwargs, targets = model_inputs(ids, labels, positions, "flash_attention_2")
    learning = sum(n for row in ROWS[2] for n in row if n > 1)  # padding and the one-token document go
    assert kwargs["input_ids"].shape == (1, learning) and targets.shape == (learning,)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 29, 33]
    assert kwargs["max_length_q"] == 12
    assert (targets != IGNORE_INDEX).sum() == (next_token_targets(labels, positions) != IGNORE_INDEX).sum()
    # launcher_sdpa: the same tokens and targets, sorted into padded buckets (12 | 9 | 5 4+1 | 3).
    padded, slot_targets = model_inputs(ids, labels, positions, "launcher_sdpa")
    assert padded["cu_seq_lens_q"].tolist() == [0, 12, 21, 26, 31, 34] and padded["max_length_q"] == 12
    assert torch.equal(in_token_order(padded, slot_targets), targets)
    assert torch.equal(in_token_order(padded, padded["input_ids"][0]), kwargs["input_ids"][0])
    assert int((slot_targets != IGNORE_INDEX).sum()) == int((targets != IGNORE_INDEX).sum())
    # An empty row (equal forward counts in evaluation) still gives the model one token.
    kwargs, targets = model_inputs(
        torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), IGNORE_INDEX), torch.arange(8)[None], "launcher_sdpa"
    )
    assert kwargs["input_ids"].shape == (1, 8) and bool((targets == IGNORE_INDEX).all())


def test_padding_computed_is_what_the_model_gets(monkeypatch) -> None:
    """metrics.jsonl's pad_tokens: the padding the model computes. A flattened row drops the rows'
    own padding; launcher_sdpa's layout adds its buckets' (on CPU); rows that go as they are keep theirs."""
    monkeypatch.setitem(sdpa_varlen.PAD_FACTOR, "cpu", 1.25)
    rows = [[5, 9, 3], [12, 4]]
    _, ids, labels, positions = packed_batch(rows)
    kwargs, _ = model_inputs(ids, labels, positions, "launcher_sdpa")
    assert padding_computed(rows, "launcher_sdpa", "cpu") == kwargs["input_ids"].shape[1] - 33 == 1  # 12 | 9 | 5 4+1 | 3
    assert padding_computed(rows, "flash_attention_2", "cuda") == padding_computed(rows, "launcher_sdpa", "cuda") == 0
    assert padding_computed(rows, "eager", "cpu") == padding_computed(rows, "launcher_sdpa", "cpu", flatten=False) == 2 * 17 - 33


@torch.no_grad()
def test_sdpa_varlen_takes_a_row_it_did_not_lay_out(models) -> None:
    """Given a compact row (FlashAttention's contract: documents in row order, unpadded), the
    function reads the documents from cu_seqlens itself and stays exact."""
    model = models["mistral"]
    docs, ids, labels, positions = packed_batch(ROWS[4], seed=5)
    kwargs, _ = model_inputs(ids, labels, positions, "flash_attention_2")
    model.config._attn_implementation = "launcher_sdpa"
    logits = model(**kwargs).logits[0]
    assert (logits - _alone(model, docs)).abs().max().item() <= 1e-5


def test_prompt_tuning_rows_pass_nothing_but_ids(models) -> None:
    """Prompt tuning runs unpacked: rows as they are, through peft's virtual tokens."""
    from peft import PromptTuningConfig, get_peft_model

    from launcher.runtime.model.methods import _align_prompt_tuning_io

    model = AutoModelForCausalLM.from_config(_configs()["llama"], attn_implementation="launcher_sdpa")
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _align_prompt_tuning_io(peft_model, 3)
    _, ids, labels, positions = packed_batch([[10], [7]])
    kwargs, targets = model_inputs(ids, labels, positions, "launcher_sdpa", flatten=False)
    assert set(kwargs) == {"input_ids"}
    with torch.no_grad():
        logits = peft_model(**kwargs).logits
    assert logits.shape == (2, WIDTH, VOCAB) and targets.shape == (2 * WIDTH,)


@torch.no_grad()
def test_sdpa_varlen_bidirectional_encoder_per_document() -> None:
    """An encoder (BERT: is_causal False) on the same contract: each document sees all of itself only."""
    from transformers import BertConfig, BertModel

    attn_implementation("sdpa", "cpu")
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = BertModel(config, add_pooling_layer=False).eval()
    docs, ids, labels, positions = packed_batch(ROWS[2])
    model.config._attn_implementation = "launcher_sdpa"
    kwargs, _ = model_inputs(ids, labels, positions, "launcher_sdpa")
    kwargs.pop("use_cache")
    packed = in_token_order(kwargs, model(**kwargs).last_hidden_state[0])
    model.config._attn_implementation = "eager"
    alone = torch.cat([model(input_ids=d[None]).last_hidden_state[0] for d in _learning(docs)])
    assert (packed - alone).abs().max().item() <= 1e-5


class _Tokenizer:
    """What the evaluation's generation asks of a tokenizer; token 1 ends an answer."""

    eos_token_id = 1

    def convert_tokens_to_ids(self, token: str) -> int:
        return 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2] * len(text.split())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("implementation", ["launcher_sdpa", "eager"])
@torch.no_grad()
def test_grouped_generation_equals_greedy_one_at_a_time_with_as_many_forwards_on_every_rank(models, implementation: str) -> None:
    """CausalLM.generate (runtime/train/tasks.py) as each of 2 ranks runs it: rank 0's two prompts
    exceed the group budget (max_seq_len 40 x micro-batch 1) and take two groups, rank 1's one takes
    one; both ranks run the same number of forwards (a sharded model gathers in each), and every
    answer is the one greedy decoding of that prompt alone gives."""
    from types import SimpleNamespace

    from launcher.runtime.train.tasks import CausalLM

    model = models["llama"]
    model.config._attn_implementation = implementation
    gen = torch.Generator().manual_seed(5)
    prompts = [{"prompt_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist(), "answer": "a b c d e"} for n in (20, 20, 19)]
    calls: list[int] = []

    class Counted(torch.nn.Module):  # a wrapper with `.module`, as DDP is: logits_to_keep is read through it
        def __init__(self) -> None:
            super().__init__()
            self.module = model

        def forward(self, **kwargs):
            calls.append(1)
            return self.module(**kwargs)

    counted = Counted()

    cfg = SimpleNamespace(
        train=SimpleNamespace(eval_exact_match=3, micro_batch_size=1),
        method=SimpleNamespace(name="full"),
        data=SimpleNamespace(max_seq_len=40),
    )
    answers, forwards = {}, []
    for rank in range(2):
        calls.clear()
        info = SimpleNamespace(rank=rank, world_size=2, device=torch.device("cpu"))
        ctx = SimpleNamespace(
            cfg=cfg, info=info, model=counted, tokenizer=_Tokenizer(), eval_prompts=prompts, attn_implementation=implementation,
            backend="fsdp", compute_dtype=torch.float32,
        )  # fmt: skip
        answers.update({a["index"]: a["prediction"] for a in CausalLM().generate(ctx)})
        forwards.append(len(calls))
    assert forwards == [2 * 6, 2 * 6]  # two groups on rank 0, one (and a one-token stand-in group) on rank 1; 5 + 1 new tokens each
    for index, prompt in enumerate(prompts):
        ids = list(prompt["prompt_ids"])
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == 1:
                break
        generated = ids[len(prompt["prompt_ids"]) :]
        expected = generated[: generated.index(1)] if 1 in generated else generated
        assert answers[index] == " ".join(map(str, expected)), index
