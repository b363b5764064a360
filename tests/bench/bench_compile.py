"""Benchmark: the tiny recipe's step time with train.compile on and off (FSDP2, 2 ranks, gloo),
each measured in a real `launcher run`. Not a test.

    .venv/bin/python tests/bench/bench_compile.py [--steps 30] [--skip 8] [-- extra overrides]

The first `--skip` steps are left out (compilation, and recompiles for new packed shapes); the
median over the rest is reported, with each run's wall time (compilation included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(out: Path, steps: int, compiled: bool, extra: list[str]) -> tuple[list[float], list[float], float]:
    """(tokens/s per logged step, losses, wall seconds) of one launcher run."""
    overrides = [
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_batches=0",
        "train.eval_exact_match=0",
        "checkpoint.every=0",
        "checkpoint.resume=never",
        f"train.compile={str(compiled).lower()}",
        *extra,
    ]
    begin = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", *overrides, "--out", str(out)], check=True, capture_output=True
    )
    wall = time.perf_counter() - begin
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    return [r["tokens_per_s"] for r in steps_logged], [r["loss"] for r in steps_logged], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=8)
    parser.add_argument("extra", nargs="*", help="more overrides, e.g. train.activation_checkpointing=selective")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, losses = {}, {}
        for compiled in (False, True):
            speeds, losses[compiled], wall = run(Path(tmp) / f"compile-{compiled}", args.steps, compiled, args.extra)
            rows[compiled] = (statistics.median(speeds[args.skip :]), wall)
    print(f"| train.compile | tokens/s (median, steps after the first {args.skip}) | run wall s |")
    print("|---|---|---|")
    for compiled, (speed, wall) in rows.items():
        print(f"| {str(compiled).lower()} | {speed:,.0f} | {wall:.0f} |")
    print(f"compiled / eager: {rows[True][0] / rows[False][0]:.2f}x")
    print(f"largest loss difference over {args.steps} steps: {max(abs(a - b) for a, b in zip(*losses.values(), strict=True)):.2e}")


if __name__ == "__main__":
    main()
