"""Benchmark: OpenMP threads beside a busy process. Not a test.

    .venv/bin/python tests/bench/bench_openmp_spin.py [--steps 20] [--settings default 1000 passive]

The tiny recipe as one process with 2 threads (`parallel.backend=single`, cluster.cpus_per_task 2),
first on idle cores, then beside one busy process (a Python loop), for each setting of how long
torch's OpenMP threads (GNU libgomp) spin at a barrier: libgomp's default (300,000 spins; the run gets
`GOMP_SPINCOUNT=300000`, since the plan now defaults it to 1000), 1000 (the plan's default on CPU,
launcher/plan/network.py) and OMP_WAIT_POLICY=PASSIVE (sleep at once). Prints the seconds of the
steps after the 5th (metrics.jsonl's `elapsed`) and of the whole `launcher run`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"default": {"GOMP_SPINCOUNT": "300000"}, "1000": {"GOMP_SPINCOUNT": "1000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
SKIP = 5


def run(steps: int, env: dict[str, str]) -> tuple[float, float]:
    out = ROOT / ".cache" / "bench_openmp_spin" / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = [f"train.max_steps={steps}", "train.log_every=1", "train.eval_batches=0", "train.eval_exact_match=0"]
    args += ["checkpoint.every=0", "checkpoint.resume=never", "parallel.backend=single", "cluster.gpus_per_node=1"]
    args += ["train.micro_batch_size=8", "train.plot=false"]
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    begin = time.perf_counter()
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "launcher"), "run", "recipes/tiny-cpu.yaml", *args, "--out", str(out)],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
    )  # fmt: skip
    whole = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    elapsed = {r["step"]: r["elapsed"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    return elapsed[steps] - elapsed[SKIP], whole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    print(f"| setting | idle cores: steps {SKIP + 1}-{args.steps} s | whole s | beside a busy process: steps s | whole s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.settings:
        idle = run(args.steps, SETTINGS[name])
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = run(args.steps, SETTINGS[name])
        finally:
            busy.kill()
            busy.wait()
        print(f"| {name} | {idle[0]:.2f} | {idle[1]:.1f} | {loaded[0]:.2f} | {loaded[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
