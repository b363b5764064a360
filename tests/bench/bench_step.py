"""Benchmark: where one steady training step of issue 15's job goes, per part. Not a test.

    .venv/bin/python tests/bench/bench_step.py [--steps 40] [--profile] [overrides ...]

Plans bench_peers.py's job (its recipe and assets, built under .cache/bench_peers if missing) and
runs it on 2 gloo processes started here (the environment torchrun would give, OMP_NUM_THREADS=1),
each running the real worker (`launcher.runtime.__main__.main`) with timers wrapped around the
loop's parts. Rank 0 reports milliseconds per step over the steady steps (after the 10th): the
batch built from the memory-mapped rows, the model inputs (packing contract and varlen plan),
forward + loss, backward (which includes DDP's gradient all-reduce: gloo runs it during backward
and the step waits for it at the end), clipping, the optimizer step, the log step (the loss
all-reduce, begun before the optimizer step and waited for after it), the token count, the
progress line and metrics.jsonl, and the step boundary (signal agreement, checkpoint poll).
`--profile` also prints torch.profiler's CPU table for rank 0's steady steps (the profiler's own
overhead inflates the parts: use it for shares).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SKIP = 10
PARTS = ("batch", "inputs", "forward+loss", "backward", "clip", "optimizer", "log", "tokens", "report", "boundary")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the worker: the real orchestrator, with timers -------------------------------------------------


def _instrument(out: Path, profile: bool) -> None:
    """Wrap the loop's parts in timers that count only the steady steps."""
    import torch
    from launcher.kernels import attention

    from launcher.runtime.data import packing
    from launcher.runtime.train import loop, metrics

    spent: dict[str, list[float]] = defaultdict(list)
    state = {"step": 0, "now": defaultdict(float)}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                state["now"][name] += time.perf_counter() - begin  # type: ignore[index]
                state["now"][name + " cpu"] += time.process_time() - cpu  # type: ignore[index]

        return wrapper

    packing.TokenData.batch = timed("batch", packing.TokenData.batch)  # type: ignore[method-assign]
    attention.model_inputs = timed("inputs", attention.model_inputs)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    loop._optimizer_step = timed("optimizer", loop._optimizer_step)
    start_sum = loop.start_sum

    def started(values: Any) -> Any:  # a log step's sum: its start, then the wait for its result
        return timed("log", timed("log", start_sum)(values))

    loop.start_sum = started
    loop.step_tokens = timed("tokens", loop.step_tokens)
    metrics.Reporter.step = timed("report", metrics.Reporter.step)  # type: ignore[method-assign]
    token_loss_sum = timed("forward+loss", loop.token_loss_sum)
    loop.token_loss_sum = token_loss_sum
    from launcher.runtime.train import tasks

    tasks.token_loss_sum = token_loss_sum
    original_train, original_step = loop.train, loop.train_step
    profiler: Any = None

    def train_step(ctx: Any, step: int, log: bool = True) -> Any:
        nonlocal profiler
        state["now"] = defaultdict(float)
        if profile and step == SKIP and ctx.info.is_main:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        begin, cpu = time.perf_counter(), time.process_time()
        result = original_step(ctx, step, log)
        state["now"]["step"] += time.perf_counter() - begin  # type: ignore[index]
        state["now"]["step cpu"] += time.process_time() - cpu  # type: ignore[index]
        state["step"] = step + 1
        return result

    def train(ctx: Any, start_step: int, on_step_end: Callable[[int], bool]) -> int:
        def boundary(step: int) -> bool:
            begin, cpu = time.perf_counter(), time.process_time()
            stop = on_step_end(step)
            now: dict[str, float] = state["now"]  # type: ignore[assignment]
            now["boundary"] += time.perf_counter() - begin
            now["boundary cpu"] += time.process_time() - cpu
            if SKIP < step < ctx.cfg.train.max_steps:  # the last step's boundary holds the final save
                for key, value in now.items():
                    spent[key].append(value)
                spent["wall"].append(time.perf_counter() - state["end"])  # type: ignore[operator]
                spent["wall cpu"].append(time.process_time() - state["end cpu"])  # type: ignore[operator]
            state["end"], state["end cpu"] = time.perf_counter(), time.process_time()
            return stop

        done = original_train(ctx, start_step, boundary)
        if ctx.info.is_main:
            if profiler is not None:
                profiler.__exit__(None, None, None)
                (out / "profile.txt").write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            (out / "parts.json").write_text(json.dumps(spent))
        return done

    loop.train_step, loop.train = train_step, train


def worker(plan: Path, profile: bool) -> None:
    _instrument(plan.parent, profile)
    from launcher.runtime.__main__ import main

    code = main(["--plan", str(plan)])
    sys.stdout.flush()
    os._exit(code)


# ---- the parent: plan, start two ranks, print the parts ---------------------------------------------


def run(tag: str, overrides: list[str], steps: int, profile: bool) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers import build_assets

    from launcher.cli import main as cli

    work = ROOT / ".cache" / "bench_peers"
    assets = build_assets(work)
    out = ROOT / ".cache" / "bench_step" / tag
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            assert cli(["plan", str(assets["recipe"]), f"train.max_steps={steps}", *overrides, "--out", str(out)]) == 0
        finally:
            sys.stdout = stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, __file__, "--worker", str(out / "plan.json")] + (["--profile"] if profile else [])
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL) for r in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a rank failed; see {out}/logs")
    parts = json.loads((out / "parts.json").read_text())
    if profile:
        print((out / "profile.txt").read_text())
    return {k: 1000 * statistics.mean(v) for k, v in parts.items()}


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's CPU table (rank 0, steady steps)")
    parser.add_argument("--worker", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.profile)
        return
    os.environ.setdefault("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = _load()
    ms = run("run", args.overrides, args.steps, args.profile)
    print(
        f"rank 0, ms per steady step (steps {SKIP + 1}-{args.steps - 1}, mean; the last one ends in the final save); load average {load} before, {_load()} after"
    )
    print(f"  {'part':<14} {'wall':>7} {'cpu':>7}")
    for part in (*PARTS, "step", "wall"):
        print(f"  {part:<14} {ms.get(part, 0.0):7.2f} {ms.get(part + ' cpu', 0.0):7.2f}")
    print("  (forward+loss includes inputs; optimizer includes clip; step = train_step; wall = step to step)")


if __name__ == "__main__":
    main()
