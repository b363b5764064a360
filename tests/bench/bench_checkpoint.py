"""Benchmark: how long a checkpoint save blocks the training loop, async vs sync, and save/load
throughput. Not a test (pytest does not collect tests/bench).

    .venv/bin/python tests/bench/bench_checkpoint.py [--hidden 512 --layers 8 --repeats 3]

Relaunches itself under torchrun with 2 CPU ranks (gloo), shards a Llama of the given size with
FSDP2 through the runtime's own code, and times `Saver.save` (what the loop waits for) and
`checkpoint.load`, using the same classes the runtime uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.runtime.parallel.dist import init_distributed, teardown
    from launcher.runtime.parallel.native import apply_fsdp
    from launcher.runtime.parallel.optim import build_optimizer
    from launcher.runtime.state import checkpoint as ckpt

    info = init_distributed("cpu")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    )
    model = LlamaForCausalLM(config)
    plan = {
        "mesh": {"shape": [info.world_size], "dim_names": ["shard"]},
        "mixed_precision": {"param_dtype": "float32", "reduce_dtype": "float32"},
        "cpu_offload": False,
        "shard_module_class": "LlamaDecoderLayer",
        "reshard_after_forward": True,
        "reshard_root_after_forward": False,
    }
    model = apply_fsdp(model, plan, info)
    optimizer = build_optimizer(model, __import__("launcher.config.schema", fromlist=["OptimSection"]).OptimSection())
    ids = torch.randint(0, 8192, (2, 128))

    def train_step() -> float:
        begin = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - begin

    train_step()  # optimizer state exists, as in a real save
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # params + Adam m, v
    results: dict[str, list[float]] = {"sync_block": [], "async_block": [], "async_total": [], "load": [], "step": []}
    root = Path(args.dir)
    group = dist.new_group(backend="gloo")
    for repeat in range(args.repeats):
        results["step"].append(train_step())
        saver = ckpt.Saver(root / f"sync{repeat}", info.rank, keep_last=1)
        dist.barrier()
        begin = time.perf_counter()
        saver.save(model, optimizer, {"step": 1})
        results["sync_block"].append(time.perf_counter() - begin)

        saver = ckpt.Saver(
            root / f"async{repeat}", info.rank, keep_last=1, async_save=True, group=group, poll_group=dist.new_group(backend="gloo")
        )
        dist.barrier()
        begin = time.perf_counter()
        saver.save(model, optimizer, {"step": 1})
        results["async_block"].append(time.perf_counter() - begin)
        while not saver.poll():  # the loop keeps stepping while the write goes on
            train_step()
        results["async_total"].append(time.perf_counter() - begin)

        dist.barrier()
        begin = time.perf_counter()
        ckpt.load(ckpt.step_dir(root / f"sync{repeat}", 1), model, optimizer, info.rank)
        results["load"].append(time.perf_counter() - begin)
    if info.is_main:
        best = {k: min(v) for k, v in results.items()}
        best["state_mb_per_rank"] = state_bytes / info.world_size / 1e6
        best["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        print(json.dumps(best))
    teardown(synchronise=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--worker"]
        command += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--repeats", str(args.repeats), "--dir", tmp]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{"))
    result = json.loads(line)
    mb = result["state_mb_per_rank"]
    print(f"model {result['params_m']:.1f} M params, {mb:.0f} MB of model+optimizer state per rank, 2 ranks (gloo, CPU)")
    print(f"sync save blocks the loop   {result['sync_block']:.3f} s  ({mb / result['sync_block']:.0f} MB/s per rank)")
    ratio = result["async_block"] / result["sync_block"]
    print(
        f"async save blocks the loop  {result['async_block']:.3f} s  ({100 * ratio:.1f} % of sync); done after {result['async_total']:.3f} s"
    )
    print(f"load (resharding reader)    {result['load']:.3f} s  ({mb / result['load']:.0f} MB/s per rank)")
    print(f"one training step           {result['step']:.3f} s")


if __name__ == "__main__":
    main()
