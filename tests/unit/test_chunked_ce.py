"""Chunked linear + cross-entropy equals the plain loss on full logits (value and gradients), and
the swapped LM head gives the model's own loss, tied weights and peft included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from launcher.kernels.loss import IGNORE_INDEX, choose, head_loss, labelled_rows, linear_cross_entropy_sum, output_head
from transformers import AutoModelForCausalLM

VOCAB = 103


def _problem(tokens: int = 37, hidden: int = 16, vocab: int = VOCAB, seed: int = 0, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen).mul_(0.5).requires_grad_()
    b = torch.randn(vocab, generator=gen).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::3] = IGNORE_INDEX
    return h, w, b, targets


def _plain(h, w, b, targets):
    return F.cross_entropy(F.linear(h, w, b), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("token_chunk", "vocab_chunk"), [(8, 17), (64, 1024), (1, 7)])
def test_loss_and_gradients_equal_full_logits(bias: bool, token_chunk: int, vocab_chunk: int) -> None:
    h, w, b, targets = _problem(bias=bias)
    params = [h, w] + ([b] if b is not None else [])
    expected = _plain(h, w, b, targets)
    expected_grads = torch.autograd.grad(expected, params)
    got = linear_cross_entropy_sum(h, w, targets, b, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    got_grads = torch.autograd.grad(got * 1.0, params)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) <= 1e-6 * abs(expected.item())  # a sum of 24 losses: relative
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_gradient_scales_with_upstream_and_ignores_everything_ignored() -> None:
    h, w, _, targets = _problem()
    got = linear_cross_entropy_sum(h, w, targets, token_chunk=8, vocab_chunk=17)
    (grad_h,) = torch.autograd.grad(got * 0.25, [h])
    (expected_h,) = torch.autograd.grad(_plain(h, w, None, targets) * 0.25, [h])
    torch.testing.assert_close(grad_h, expected_h, rtol=1e-6, atol=1e-6)
    assert bool((grad_h[::3] == 0).all())  # ignored tokens get no gradient
    none = torch.full_like(targets, IGNORE_INDEX)
    zero = linear_cross_entropy_sum(h, w, none)
    grad_h, grad_w = torch.autograd.grad(zero, [h, w])
    assert zero.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_bf16_autocast_matches_plain_bf16() -> None:
    h, w, _, targets = _problem(tokens=64, hidden=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, w, targets, token_chunk=16, vocab_chunk=32)
        logits = F.linear(h, w)
    expected = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) / expected.item() < 1e-3
    assert torch.autograd.grad(got, [w])[0].dtype == torch.float32


def _tiny(arch: str) -> torch.nn.Module:
    from transformers import GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":  # tied input / output embeddings
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _batch(tokens: int = 40):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
    targets = torch.cat([ids[0, 1:], torch.tensor([IGNORE_INDEX])])
    targets[:5] = IGNORE_INDEX
    return ids, targets


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-lora"])
def test_swapped_head_gives_the_models_loss(arch: str) -> None:
    model = _tiny(arch.split("-")[0])
    if arch.endswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or "embed_tokens" in name)
    ids, targets = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    plain = F.cross_entropy(model(input_ids=ids).logits[0], targets, ignore_index=IGNORE_INDEX, reduction="sum")
    plain_grads = torch.autograd.grad(plain, params)
    with head_loss(model, targets) as take:
        fused = take(model(input_ids=ids))
    fused_grads = torch.autograd.grad(fused, params)
    assert abs(fused.item() - plain.item()) <= 1e-6 * abs(plain.item())
    for g, e in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    # The head on the labelled tokens only (6 of 40 have no target): the same loss and gradients.
    rows = labelled_rows(targets)
    assert rows is not None and rows.tolist() == [i for i, t in enumerate(targets.tolist()) if t != IGNORE_INDEX]
    seen: list[int] = []
    output_head(model).register_forward_hook(lambda _m, _a, out: seen.append(out.numel()))
    with head_loss(model, targets, rows=rows) as take:
        compact = take(model(input_ids=ids))
    compact_grads = torch.autograd.grad(compact, params)
    assert abs(compact.item() - plain.item()) <= 1e-6 * abs(plain.item())
    for g, e in zip(compact_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    assert seen == [1]  # the swapped head returned the loss sum, once
    assert "forward" not in output_head(model).__dict__  # the head is restored
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # one tensor: both uses reach its gradient


def test_labelled_rows_leave_nothing_out_when_every_token_or_none_has_a_target() -> None:
    assert labelled_rows(torch.tensor([3, 4, 5])) is None  # nothing to leave out
    assert labelled_rows(torch.full((4,), IGNORE_INDEX)) is None  # the head still runs once (an empty row)
    assert labelled_rows(torch.tensor([[IGNORE_INDEX, 7], [8, IGNORE_INDEX]])).tolist() == [1, 2]


def test_models_that_change_logits_after_the_head_keep_the_plain_loss() -> None:
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8)
    softcapped = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert output_head(softcapped) is None and choose("auto", softcapped, "cpu") == "plain"
    with pytest.raises(RuntimeError, match=r"kernels\.loss: chunked"):
        choose("chunked", softcapped, "cpu")
    # Post-processing the config does not announce is caught on the output itself.
    model = _tiny("llama")
    model.register_forward_hook(lambda _m, _a, out: setattr(out, "logits", out.logits * 2.0) or out)
    ids, targets = _batch()
    with pytest.raises(RuntimeError, match="changes the logits"), head_loss(model, targets) as take:
        take(model(input_ids=ids))


def test_choice_on_cpu() -> None:
    model = _tiny("llama")
    assert choose("auto", model, "cpu") == "chunked" and choose("plain", model, "cpu") == "plain"
    with pytest.raises(RuntimeError, match="liger"):
        choose("liger", model, "cpu")


@pytest.mark.parametrize(("override", "key"), [("kernels.loss=liger", "kernels.loss"), ("kernels.liger=true", "kernels.liger")])
def test_cuda_only_kernels_refused_on_cpu(override: str, key: str, tmp_path, capsys) -> None:
    from launcher.cli import main

    assert main(["plan", "tiny-cpu.yaml", override, "--out", str(tmp_path / "run")]) == 2
    assert f"error: {key}: " in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_loss_setting_loads() -> None:
    from launcher.config import load_config

    assert load_config("tiny-cpu.yaml").kernels.loss == "auto"
    assert load_config("tiny-cpu.yaml", ["kernels.loss=plain"]).kernels.loss == "plain"


def test_wrapped_outputs_pass_math_does_not() -> None:
    """ZeRO-3 / DDP hand a module's output back through a custom autograd Function: accepted."""
    from launcher.kernels.loss import _passed_through

    class Wrap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.detach()

        @staticmethod
        def backward(ctx, grad):
            return grad

    h, w, _, targets = _problem()
    loss = linear_cross_entropy_sum(h, w, targets)
    assert _passed_through(loss, loss) and _passed_through(Wrap.apply(Wrap.apply(loss)), loss)
    assert not _passed_through(torch.tanh(loss / 30) * 30, loss) and not _passed_through(Wrap.apply(loss * 2), loss)
    with torch.no_grad():
        quiet = linear_cross_entropy_sum(h, w, targets)
        assert _passed_through(Wrap.apply(quiet), quiet) and not _passed_through(quiet * 2, quiet)


@pytest.mark.parametrize("one_block", [True, False])
def test_backward_never_waits_for_the_device(one_block: bool) -> None:
    """No op in the loss's forward or backward reads a value back to the host (nonzero, item,
    masked_select): on CUDA each one is a sync, once per block of every micro-batch (issue 24)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"nonzero", "_local_scalar_dense", "masked_select", "item", "unique", "_unique2"}
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    h, w, _, targets = _problem(tokens=40)
    with Record():
        loss = linear_cross_entropy_sum(h, w, targets, token_chunk=40 if one_block else 8, vocab_chunk=VOCAB if one_block else 17)
        loss.backward()
    assert seen and "mm" in seen  # the recorder saw the matmuls
    assert not syncing & set(seen), sorted(syncing & set(seen))


def test_liger_accumulates_the_head_gradient_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's fused loss is CUDA-only: a stand-in with its signature records what we pass."""
    import sys
    import types

    passed: dict = {}

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean", accum_dtype=None):
        passed.update(accum_dtype=accum_dtype, reduction=reduction, ignore_index=ignore_index)
        return torch.zeros(())

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    from launcher.kernels.liger import liger_linear_cross_entropy_sum

    h, w, _, targets = _problem()
    liger_linear_cross_entropy_sum(h, w, targets)
    assert passed == {"accum_dtype": torch.float32, "reduction": "sum", "ignore_index": IGNORE_INDEX}
