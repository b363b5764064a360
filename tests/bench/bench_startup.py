"""Benchmark: where the start and the end of a `launcher run` go, and each process's peak RSS. Not a test.

    .venv/bin/python tests/bench/bench_startup.py [--runs 3] [--recipe R] [--vs TREE] [overrides ...]

Runs the tiny recipe for 4 steps (warm data cache, no evaluation, one save at the end) and stamps
every output line as it arrives: the data prepared (the `launcher run` process, no torch), the ranks
up (workers started and imported torch; through a torchrun agent if `launcher run` uses one),
transformers imported (the attention choice is printed after it), the first step (the model built
and one optimizer step), done, loss.png drawn, the process gone. A sampler reads the process tree
every 0.05 s for the peak RSS of `launcher run`, of an agent if there is one, and of each worker.
Medians over the runs. `--vs TREE` (another checkout, e.g. a `git worktree` of an older commit, with
`launcher/kernels` linked to its `kernels/src/`, or `kernels/` before issue 22) runs that tree's `launcher run` in turn with this one's,
A B A B, and prints the ratio of each event's time pair by pair (median): on a shared machine the
load moves both alike.
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
    ("transformers imported", "launcher: attention:"),
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


def one_run(out: Path, overrides: list[str], root: Path = ROOT, recipe: str = "tiny-cpu.yaml") -> tuple[dict[str, float], dict[str, float]]:
    argv = [sys.executable, "-m", "launcher", "run", recipe, "train.max_steps=4", "optim.warmup_steps=1"]
    argv += ["checkpoint.every=0", "train.eval_batches=0", "train.eval_exact_match=0", *overrides, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root)}  # that tree's code, ranks included (they inherit it)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
    sampler.start()
    seen: dict[str, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-20:], line]
        for name, marker in EVENTS:
            if name not in seen and marker in line:
                seen[name] = time.monotonic() - t0
    proc.wait()
    seen["exited"] = time.monotonic() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"launcher run ({root}) exited {proc.returncode}:\n" + "".join(tail))
    workers = [v for k, v in peaks.items() if k.startswith("worker")]
    rss = {"launcher run": peaks.get("launcher run", 0.0), "worker (max)": max(workers, default=0.0)}
    if "agent" in peaks:  # `launcher run` starts the ranks itself now; launch.sh still goes through torchrun
        rss["agent"] = peaks["agent"]
    return seen, rss


def table(timings: list[dict[str, float]], memory: list[dict[str, float]]) -> str:
    lines = ["| event | at s | since the previous |", "|---|---:|---:|"]
    previous = 0.0
    for name in [n for n, _ in EVENTS] + ["exited"]:
        values = [t[name] for t in timings if name in t]
        if not values:
            continue
        at = statistics.median(values)
        lines.append(f"| {name} | {at:.1f} | {at - previous:.1f} |")
        previous = at
    lines += ["", "| process | peak RSS MiB |", "|---|---:|"]
    lines += [f"| {key} | {statistics.median(m.get(key, 0.0) for m in memory):.0f} |" for key in memory[0]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--recipe", default="tiny-cpu.yaml", help="a shipped recipe's name or a path")
    parser.add_argument("--vs", default="", help="another checkout to run in turn with this one (A = this tree, B = that)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trees = {"A": ROOT, **({"B": Path(args.vs).resolve()} if args.vs else {})}
    recipe = str(Path(args.recipe).resolve()) if Path(args.recipe).is_file() else args.recipe
    timings: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    memory: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for key, root in trees.items():  # data cache and tiny model built, page cache warm
            one_run(Path(tmp) / f"warm-{key}", args.overrides, root, recipe)
        for i in range(args.runs):
            for key, root in trees.items():
                seen, rss = one_run(Path(tmp) / f"r{i}-{key}", args.overrides, root, recipe)
                timings[key].append(seen)
                memory[key].append(rss)
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.runs} runs; seconds since `launcher run` started")
    for key, root in trees.items():
        print(f"\n{key}: {root}\n" + table(timings[key], memory[key]))
    if args.vs:
        print("\n| event | A / B (median of the pairs) |\n|---|---:|")
        for name in [n for n, _ in EVENTS] + ["exited"]:
            pairs = [a[name] / b[name] for a, b in zip(timings["A"], timings["B"]) if name in a and name in b and b[name] > 0]
            if pairs:
                print(f"| {name} | {statistics.median(pairs):.2f} |")


if __name__ == "__main__":
    main()
