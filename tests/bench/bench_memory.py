"""Benchmark: the estimator against published and third-party figures (the rows of RESULTS.md's
memory section). Not a test (pytest does not collect tests/bench); torch-free except DeepSpeed's
own estimator, which it calls.

    .venv/bin/python tests/bench/bench_memory.py

1. Llama-3.1-8B, 8 GPUs, FSDP2, sequence 8192, micro-batch 2, plain cross-entropy (as torchtitan
   trains it), with full and without activation checkpointing (torchtitan's run used its
   op-level selective checkpointing, which lies between the two): the per-GPU items.
2. The 70B ZeRO-3 offload recipe's host-memory line against DeepSpeed's
   `estimate_zero3_model_states_mem_needs_all_cold` for the same model and nodes.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config import load_config
from launcher.plan.estimate import estimate_plan
from launcher.plan.estimate.memory import DEVICE_ITEMS, GIB
from launcher.plan.estimate.params import block_linears, count_params
from launcher.plan.topology import build_topology

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def estimate(recipe: str, overrides: list[str]) -> dict[str, float]:
    cfg = load_config(RECIPES / recipe, [*overrides, "cluster.gpu_memory_gib=null"])
    return estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))


def selective(row: dict[str, float]) -> dict[str, float]:
    """The no-checkpointing estimate with torchtitan's op-level selective checkpointing in place of
    no checkpointing (the runtime has no such mode; the estimator's per-block figure for it)."""
    blocks = 32 * (row["activations_block_none"] - row["activations_block_selective"])
    out = dict(row, activations=row["activations"] - blocks)
    out["fragmentation"] = row["fragmentation"] * (1 - blocks / (row["total"] - row["fragmentation"] - row["context"]))
    out["total"] = sum(out[k] for k in DEVICE_ITEMS)
    return out


def torchtitan_8b() -> None:
    setting = ["data.max_seq_len=8192", "train.micro_batch_size=2", "train.global_batch_size=16", "kernels.loss=plain"]
    rows = {
        "full AC": estimate("llama3-8b-full-fsdp.yaml", [*setting, "train.activation_checkpointing=true"]),
        "selective AC": selective(estimate("llama3-8b-full-fsdp.yaml", [*setting, "train.activation_checkpointing=false"])),
        "no AC": estimate("llama3-8b-full-fsdp.yaml", [*setting, "train.activation_checkpointing=false"]),
        "full AC, chunked loss": estimate("llama3-8b-full-fsdp.yaml", [*setting[:-1], "train.activation_checkpointing=true"]),
    }
    print("Llama-3.1-8B, 8 GPUs, FSDP2, seq 8192, micro-batch 2 (GiB per GPU)")
    print(f"  {'item':<16}" + "".join(f"{name:>24}" for name in rows))
    for key in (*DEVICE_ITEMS, "total"):
        print(f"  {key:<16}" + "".join(f"{row[key] / GIB:24.2f}" for row in rows.values()))
    blocks = {m: rows["no AC"][f"activations_block_{m}"] / GIB for m in ("none", "selective", "full")}
    print("  one block's saved activations (GiB): " + ", ".join(f"{m} {v:.3f}" for m, v in blocks.items()))
    print("  torchtitan (benchmarks/llama3_h100_202412_torchtitan.md, Table 1, FSDP, selective AC): 82.4 GiB max reserved")


def deepspeed_70b() -> None:
    cfg = load_config(RECIPES / "llama3-70b-full-zero3-offload.yaml")
    e = estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))
    counts = count_params(cfg.model, cfg.method)
    layer = counts.per_layer
    largest = max(layer, counts.head, max(i * o for pairs in block_linears(cfg.model).values() for i, o, _ in pairs))
    print("\nLlama-3.1-70B ZeRO-3, optimizer offloaded to CPU, 4 nodes x 8 GPUs (GiB per node)")
    print(f"  ours: offloaded {e['host_offloaded'] / GIB:.1f} + processes {e['host_processes'] / GIB:.1f}", end="")
    print(f" + data loaders {e['host_dataloader'] / GIB:.1f} = {e['host_total'] / GIB:.1f}")
    print(f"  ours per GPU: parameters {e['parameters'] / GIB:.2f}, gathered {e['gathered'] / GIB:.2f}, total {e['total'] / GIB:.2f}")
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    except ImportError:
        print("  (deepspeed not installed: pip install deepspeed)")
        return
    print(f"  DeepSpeed's estimator (total {counts.total:,} params, largest layer {largest:,}):")
    estimate_zero3_model_states_mem_needs_all_cold(
        total_params=counts.total, largest_layer_params=largest, num_gpus_per_node=cfg.cluster.gpus_per_node, num_nodes=cfg.cluster.nodes
    )


if __name__ == "__main__":
    torchtitan_8b()
    deepspeed_70b()
