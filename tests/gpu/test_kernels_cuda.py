"""Fused loss on CUDA (skipped without it): our chunked linear cross-entropy and Liger's (when
installed) against the plain loss on full logits, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def _problem(dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 256, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(32000, 256, device="cuda", generator=gen) * 0.06).to(dtype).requires_grad_()
    targets = torch.randint(0, 32000, (3000,), device="cuda", generator=gen)
    targets[::4] = -100
    return h, w, targets


@pytest.mark.parametrize("kind", ["chunked", "liger"])
def test_fused_loss_matches_plain_on_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from launcher.kernels.liger import has_liger, liger_linear_cross_entropy_sum
    from launcher.kernels.loss import linear_cross_entropy_sum

    if kind == "liger" and not has_liger():
        pytest.skip("liger-kernel is not installed (pip install launcher[liger])")
    fn = linear_cross_entropy_sum if kind == "chunked" else liger_linear_cross_entropy_sum
    h, w, targets = _problem(torch.float32)
    plain = F.cross_entropy(h @ w.t(), targets, ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(plain, [h, w])
    fused = fn(h, w, targets)
    fused_grads = torch.autograd.grad(fused, [h, w])
    assert abs(fused.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for g, e in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the matmuls in bf16, like F.linear would run
        low = fn(h, w, targets)
    assert abs(low.item() - plain.item()) <= 1e-2 * abs(plain.item())  # bf16 matmuls, fp32 softmax


def test_chunked_loss_runs_without_a_host_sync() -> None:
    """CUDA's sync debug mode turns any device-to-host wait inside the loss into an error."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from launcher.kernels.loss import linear_cross_entropy_sum

    h, w, targets = _problem(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy_sum(h, w, targets)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_liger_head_gradient_is_accumulated_in_fp32() -> None:
    """In bf16, Liger's head gradient (accumulated over token chunks in fp32) stays close to the fp32
    reference; accumulated in bf16 it drifts with the number of tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from launcher.kernels.liger import has_liger, liger_linear_cross_entropy_sum

    if not has_liger():
        pytest.skip("liger-kernel is not installed (pip install launcher[liger])")
    h, w, targets = _problem(torch.bfloat16)
    (grad_w,) = torch.autograd.grad(liger_linear_cross_entropy_sum(h, w, targets), [w])
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(h32 @ w32.t(), targets, ignore_index=-100, reduction="sum"), [w32])
    torch.testing.assert_close(grad_w.float(), expected, rtol=2e-2, atol=2e-2)
