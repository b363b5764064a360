"""Benchmark: peak memory and time of the LM head + cross-entropy, plain (full fp32 logits) vs our
chunked linear cross-entropy (kernels/src/loss.py), forward and backward. Not a test.

    flock /tmp/launcher-heavy.lock .venv/bin/python tests/bench/bench_loss.py [--tokens 8192 --vocab 128256 --hidden 256]

Each variant runs in a fresh process: inputs are built, the peak-RSS mark is reset
(/proc/self/clear_refs), then one forward + backward runs and VmHWM is read, so the figure is the
memory the loss itself needs above its inputs (hidden states, weight, targets) and their gradients'
final storage is included in both. The loss and gradient norms are printed to show both agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def variant(args: argparse.Namespace) -> dict[str, float | str]:
    import torch
    import torch.nn.functional as F
    from launcher.kernels.loss import IGNORE_INDEX, linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * args.hidden**-0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,))
    targets[: args.tokens // 4] = IGNORE_INDEX  # a prompt share without labels
    hidden.grad = torch.zeros_like(hidden)  # gradients' storage exists before the mark in both variants
    weight.grad = torch.zeros_like(weight)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_mib()
    start = time.perf_counter()
    if args.variant == "plain":
        loss = F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        loss = linear_cross_entropy_sum(hidden, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "variant": args.variant,
        "peak_mib": _rss_peak_mib() - base,
        "seconds": seconds,
        "loss": float(loss),
        "grad_hidden_norm": float(hidden.grad.norm()),
        "grad_weight_norm": float(weight.grad.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--variant", choices=["plain", "chunked"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(variant(args)))
        return
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}: full fp32 logits are {logits_gib:.2f} GiB")
    rows = []
    for name in ("chunked", "plain"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| variant | peak above inputs | fwd+bwd s | loss sum | grad norm hidden | grad norm weight |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.1f} | {r['loss']:.3f} | "
            f"{r['grad_hidden_norm']:.6f} | {r['grad_weight_norm']:.6f} |"
        )


if __name__ == "__main__":
    main()
