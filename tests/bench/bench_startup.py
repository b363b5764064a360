"""Benchmark: where the start and the end of a `launcher run` go, and each process's peak RSS. Not a test.

    .venv/bin/python tests/bench/bench_startup.py [--runs 3] [overrides ...]

Runs the tiny recipe for 4 steps (warm data cache, no evaluation, one save at the end) and stamps
every output line as it arrives: the data prepared (the `launcher run` process, no torch), the ranks
up (torchrun agent and workers started and imported torch), the model built (attention chosen),
the first step, done, loss.png drawn, the process gone. A sampler reads the process tree every
0.05 s for the peak RSS of the parent processes (`launcher run`, the agent) and of each worker.
Medians over the runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
EVENTS = [
    ("data prepared", "launcher: data prepared"),
    ("ranks up", "launcher: rank 0 of"),
    ("model built", "launcher: attention:"),
    ("first step", "step 1/"),
    ("done", "launcher: done."),
    ("plot drawn", "launcher: plot "),
]


def launcher_kind(cmd: str) -> str | None:
    """Which process of a `launcher run` tree a command line is (the root is the `launcher run` CLI)."""
    return "worker" if "launcher.runtime" in cmd and "launcher.agent" not in cmd else "agent" if "launcher.agent" in cmd else None


def sample(
    root: psutil.Process,
    peaks: dict[str, float],
    stop: threading.Event,
    kind_of: Callable[[str], str | None] = launcher_kind,
    root_name: str = "launcher run",
) -> None:
    """Peak RSS MiB of the root (as `root_name`), each worker (`worker PID`) and the other kinds `kind_of` names."""
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for proc in procs:
            try:
                cmd = " ".join(proc.cmdline())
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
            kind = root_name if proc.pid == root.pid else kind_of(cmd)
            if kind:
                key = f"{kind} {proc.pid}" if kind == "worker" else kind
                peaks[key] = max(peaks.get(key, 0.0), rss)
        time.sleep(0.05)


def one_run(out: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    argv = [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", "train.max_steps=4", "optim.warmup_steps=1"]
    argv += ["checkpoint.every=0", "train.eval_batches=0", "train.eval_exact_match=0", *overrides, "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
    sampler.start()
    seen: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        for name, marker in EVENTS:
            if name not in seen and marker in line:
                seen[name] = time.monotonic() - t0
    proc.wait()
    seen["exited"] = time.monotonic() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"launcher run exited {proc.returncode}")
    workers = [v for k, v in peaks.items() if k.startswith("worker")]
    rss = {"launcher run": peaks.get("launcher run", 0.0), "agent": peaks.get("agent", 0.0), "worker (max)": max(workers, default=0.0)}
    return seen, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings: list[dict[str, float]] = []
    memory: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(Path(tmp) / "warm", args.overrides)  # data cache and tiny model built, page cache warm
        for i in range(args.runs):
            seen, rss = one_run(Path(tmp) / f"r{i}", args.overrides)
            timings.append(seen)
            memory.append(rss)
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.runs} runs; seconds since `launcher run` started")
    print("| event | at s | since the previous |")
    print("|---|---:|---:|")
    previous = 0.0
    for name in [n for n, _ in EVENTS] + ["exited"]:
        values = [t[name] for t in timings if name in t]
        if not values:
            continue
        at = statistics.median(values)
        print(f"| {name} | {at:.1f} | {at - previous:.1f} |")
        previous = at
    print("\n| process | peak RSS MiB |")
    print("|---|---:|")
    for key in memory[0]:
        print(f"| {key} | {statistics.median(m[key] for m in memory):.0f} |")


if __name__ == "__main__":
    main()
