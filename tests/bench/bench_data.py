"""Data preparation at scale: synthetic chat rows → `prepare_data` (roles, dedup, tokenise with
datasets.map, pack from memory-mapped arrays), wall time and peak memory per `data.num_proc`.

    flock /tmp/launcher-heavy.lock .venv/bin/python tests/bench/bench_data.py --rows 1000000 --num-proc 1 2

Each case runs in a fresh process on an empty cache. Peak memory is sampled every 0.5 s over the
whole process tree as the sum of PSS (the preparing process and datasets' worker processes, shared
pages counted once; resident pages of the memory-mapped Arrow and .npy files count), and
ru_maxrss (of the preparing process and of its workers) gives the largest single process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_rows(path: Path, rows: int, seed: int = 0) -> int:
    """Conversations of a system turn and two user/assistant exchanges; returns the content characters."""
    from launcher.runtime.model.tiny import _WORDS

    rng = random.Random(seed)
    chars = 0
    with path.open("w") as handle:
        for _ in range(rows):

            def say(k: int) -> str:
                return " ".join(rng.choices(_WORDS, k=k))

            turns = [("system", 6), ("user", 14), ("assistant", 14), ("user", 10), ("assistant", 12)]
            messages = [{"role": role, "content": say(k + rng.randrange(4))} for role, k in turns]
            chars += sum(len(m["content"]) for m in messages)
            handle.write(json.dumps({"messages": messages}) + "\n")
    return chars


class StageTimer:
    """Wall and CPU seconds (this process and its reaped workers) per preparation stage, by wrapping
    the functions prepare.py calls; what is left of the total is imports, tokenizer load and dedup."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @staticmethod
    def cpu_now() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def wrap(self, owner: object, name: str, stage: Callable[..., str]) -> None:
        inner = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            key = stage(*args, **kwargs)
            wall, cpu = time.perf_counter(), self.cpu_now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - wall
                self.cpu[key] = self.cpu.get(key, 0.0) + self.cpu_now() - cpu

        setattr(owner, name, timed)

    def install(self) -> None:
        from launcher.runtime.data import prepare

        self.wrap(prepare, "load_source", lambda *a, **k: "read json -> Arrow")
        self.wrap(prepare._Context, "map", lambda self, ds, fn, *a, **k: f"map {fn.__name__} (num_proc)")
        self.wrap(prepare, "write_flat", lambda *a, **k: "flat token files")
        self.wrap(prepare, "write_rows", lambda *a, **k: "pack + write rows")
        self.wrap(prepare, "eval_prompt", lambda *a, **k: "eval prompts")


def child(source: str, num_proc: int, cache: str) -> None:
    from launcher.config import load_config
    from launcher.runtime.data.packing import prepare_data
    from launcher.runtime.model.tiny import ensure_tiny_model

    overrides = [
        f"data.path={source}",
        "data.template=chat",
        f"data.num_proc={num_proc}",
        "data.max_seq_len=1024",
        "train.eval_exact_match=0",
    ]
    cfg = load_config(ROOT / "recipes" / "tiny-cpu.yaml", overrides)
    tiny = ensure_tiny_model()
    timer = StageTimer()
    timer.install()
    start, cpu = time.perf_counter(), timer.cpu_now()
    folder = prepare_data(cfg.data, source, tiny, Path(cache), cfg.run.seed)
    meta = json.loads((folder / "meta.json").read_text())
    seconds, cpu = time.perf_counter() - start, timer.cpu_now() - cpu
    stages = {k: [round(timer.wall[k], 1), round(timer.cpu[k], 1)] for k in timer.wall}
    stages["other (imports, tokenizer, dedup)"] = [
        round(seconds - sum(timer.wall.values()), 1),
        round(cpu - sum(timer.cpu.values()), 1),
    ]
    largest = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "stages": stages,
                "train": meta["train"],
                "source": meta["sources"][0],
                "max_process_mib": largest,
            }
        )
    )


def digest(cache: Path) -> str:
    """One hash over every file of the prepared cache (names and bytes): equal digests, equal caches."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
        h.update(str(path.relative_to(cache)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def peak_tree_pss(proc: subprocess.Popen) -> int:
    """Peak bytes of PSS summed over proc's process tree, sampled until it exits (bench_data_peers.py uses it too)."""
    import psutil

    peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))  # PSS: shared pages counted once
        except psutil.Error:
            pass
        time.sleep(0.5)  # reading smaps costs ~10 ms of CPU per process: sample sparsely, not to slow the run
    return peak


def measure(source: Path, num_proc: int, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(source), str(num_proc), str(cache)], stdout=subprocess.PIPE, text=True
    )
    peak = peak_tree_pss(proc)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"num_proc {num_proc}: preparation failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_tree_mib"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench-data"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"chat-{args.rows}.jsonl"
    start = time.perf_counter()
    chars = write_rows(source, args.rows)
    print(
        f"wrote {args.rows} rows, {chars / 1e6:.0f} M content characters, {source.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    print(
        "| num_proc | wall s | CPU s | cores busy | rows/s | peak PSS (tree) | largest process RSS | load avg | train rows | tokens | cache digest |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for _ in range(args.repeats):
        for num_proc in args.num_proc:  # interleaved, so a change in the machine's load hits both
            load = os.getloadavg()[0]
            r = measure(source, num_proc, work / f"cache-{num_proc}")
            print(
                f"| {num_proc} | {r['seconds']:.0f} | {r['cpu']:.0f} | {r['cpu'] / r['seconds']:.2f} | {args.rows / r['seconds']:,.0f} "
                f"| {r['peak_tree_mib']:,.0f} MiB | {r['max_process_mib']:,.0f} MiB | {load:.1f}-{os.getloadavg()[0]:.1f} "
                f"| {r['train']['rows']:,} | {r['train']['tokens']:,} | {digest(work / f'cache-{num_proc}')} |",
                flush=True,
            )
            print("    stages (wall s, CPU s): " + "; ".join(f"{k} {w}/{c}" for k, (w, c) in r["stages"].items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
