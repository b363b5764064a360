"""Benchmark: tokens/s and peak resident memory of full fine-tuning vs LoRA vs QLoRA on the tiny
model, each run as a user runs it (`launcher run`, 2 ranks, FSDP2 over gloo). Not a test.

    .venv/bin/python tests/bench/bench_methods.py [--steps 40] [--repeats 2]

tokens/s: real (non-padding) tokens over the summed step times, leaving out the first 3 steps
(warm-up). Peak RSS: ru_maxrss of the largest process the run started (a rank), read in a fresh
child process per run so runs do not see each other's peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
    "checkpoint.every=0",
    "checkpoint.resume=never",
    "optim.warmup_steps=2",
]
CASES: dict[str, list[str]] = {
    "full (fp32)": ["tiny-cpu.yaml"],
    "full (bf16 compute)": ["tiny-cpu.yaml", "model.dtype=bfloat16", "train.precision=bf16"],
    "LoRA r16 (fp32 base)": ["tiny-cpu.yaml", "method.name=lora", "method.lora.dropout=0", "optim.lr=5e-3"],
    "LoRA r16 (bf16 base)": [
        "tiny-cpu.yaml",
        "method.name=lora",
        "method.lora.dropout=0",
        "optim.lr=5e-3",
        "model.dtype=bfloat16",
        "train.precision=bf16",
    ],
    "QLoRA r16 (NF4 base)": ["tiny-cpu-qlora.yaml"],
}
WARMUP_STEPS = 3


def measure(args: list[str], out: Path) -> dict[str, float]:
    """Run `launcher run ARGS` in this (fresh) process's child and report its numbers."""
    command = [sys.executable, "-m", "launcher", "run", *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and r["step"] > WARMUP_STEPS]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    return {
        "tokens_per_s": sum(r["tokens"] for r in steps) / seconds,
        "step_ms": 1000 * seconds / len(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "final_loss": steps[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the fastest is reported")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure one case, print JSON
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure([*CASES[args.one], *COMMON, f"train.max_steps={args.steps}"], Path(args.out))))
        return
    print(f"{'method':24s} {'tokens/s':>9s} {'ms/step':>8s} {'peak RSS':>10s} {'loss':>7s}   ({args.steps} steps, best of {args.repeats})")
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            results = []
            for repeat in range(args.repeats):
                out = Path(tmp) / f"{len(results)}-{repeat}-{name.split()[0]}"
                child = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--out", str(out)]
                done = subprocess.run(child, capture_output=True, text=True, check=True)
                results.append(json.loads(done.stdout.splitlines()[-1]))
            best = max(results, key=lambda r: r["tokens_per_s"])
            rss = max(r["peak_rss_mib"] for r in results)
            print(f"{name:24s} {best['tokens_per_s']:9.0f} {best['step_ms']:8.1f} {rss:7.0f} MiB {best['final_loss']:7.3f}", flush=True)


if __name__ == "__main__":
    main()
