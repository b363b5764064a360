"""estimate.txt: the itemised table `launcher estimate` prints and the plan writes."""

from __future__ import annotations

from launcher.plan.estimate.cost import FS_BYTES_PER_SECOND
from launcher.plan.estimate.memory import DEVICE_ITEMS, FRAGMENTATION, GIB

_WHAT = {
    "parameters": "local shard of the parameters",
    "quantized_base": "4-bit base weights (+ absmax state)",
    "gradients": "gradients held between micro-batches",
    "optimizer": "AdamW exp_avg + exp_avg_sq (fp32)",
    "master_weights": "fp32 master copy (DeepSpeed)",
    "gathered": "all-gathered blocks + root unit, reduce buffers",
    "activations": "saved for backward, one micro-batch",
    "logits": "LM head + loss peak",
    "attention_mask": "dense [B,1,S,S] mask (eager)",
    "context": "CUDA context, NCCL, workspaces",
    "fragmentation": f"allocator slack ({FRAGMENTATION:.0%} of the above)",
}


def _gib(value: float) -> str:
    return f"{value / GIB:9.2f} GiB"


def render_estimate(e: dict[str, float], candidates: dict[int, float] | None = None) -> str:
    active = f", {_count(e['active_params'])} active per token" if e.get("active_params") else ""  # MoE
    lines = [f"parameters: {_count(e['params'])} ({_count(e['trainable_params'])} trainable{active})", "memory per GPU:"]
    for key in DEVICE_ITEMS:
        lines.append(f"  {key:<15}{_gib(e[key])}   {_WHAT[key]}")
    limit = e.get("gpu_memory_gib", 0.0)
    share = f" ({e['total'] / GIB / limit:.0%} of {limit:g} GiB)" if limit else " (cluster.gpu_memory_gib not set: not checked)"
    lines.append(f"  {'total':<15}{_gib(e['total'])}{share}")
    blocks = "  ".join(f"{m} {e[f'activations_block_{m}'] / GIB:.3f}" for m in ("none", "selective", "full"))
    lines.append(f"  activations per block by checkpointing (GiB): {blocks}")
    if candidates:
        picked = ", ".join(f"{m}: {v / GIB:.1f} GiB" for m, v in sorted(candidates.items()))
        lines.append(f"  auto micro-batch candidates: {picked}")
    lines.append("host memory per node:")
    for key, what in (
        ("host_offloaded", "offloaded states (pinned)"),
        ("host_processes", "the ranks' processes"),
        ("host_dataloader", "data loaders"),
    ):
        lines.append(f"  {key[5:]:<15}{_gib(e[key])}   {what}")
    host = e.get("host_memory_gib", 0.0)
    share = f" ({e['host_total'] / GIB / host:.0%} of cluster.mem, {host:g} GiB)" if host else " (cluster.mem unset or 0: not checked)"
    lines.append(f"  {'total':<15}{_gib(e['host_total'])}{share}")
    given = e.get("fs_bandwidth_gbps", 0.0)  # older plans: the assumed speed
    speed = f"{given:g} GB/s per node (cluster.fs_bandwidth_gbps)" if given else f"{FS_BYTES_PER_SECOND / 1e9:g} GB/s per node (assumed)"
    if e.get("save_write_gbps"):  # all nodes together, at most the file system's total (cluster.fs_total_gbps)
        speed += f", {e['save_write_gbps']:g} GB/s in all"
    lines.append(f"checkpoint per save: {e['checkpoint_bytes'] / 1e9:.1f} GB, ~{e['checkpoint_seconds']:.0f} s at {speed}")
    lines.append(f"compute: {e['flops_per_token'] / 1e9:.1f} GFLOP per token")
    if e.get("step_seconds"):
        lines.append(f"time per step: ~{e['step_seconds']:.2f} s ({e['peak_tflops']:g} TFLOP/s per GPU at {e['mfu']:.0%} MFU, assumed)")
    line = reference_line(e)
    return "\n".join(lines + ([line] if line else [])) + "\n"


def reference_line(e: dict[str, float]) -> str | None:
    """What the reference pass of dpo/ipo costs (None without one): in each step, or once before step 1."""
    flops = e.get("reference_flops_per_token", 0.0)
    if not flops:
        return None
    if e.get("reference_stored"):
        seconds = f", ~{e['reference_seconds_per_step']:.2f} s per step's rows" if e.get("reference_seconds_per_step") else ""
        return (
            f"reference pass: once before step 1, a no-grad forward of the first epoch ({_flops(flops)} per token{seconds}, "
            f"{flops / e['flops_per_token']:.0%} of the epoch's training compute), stored beside the data and reused on resume"
        )
    return (
        f"reference pass: the base with the adapters off, a no-grad forward of every micro-batch ({_flops(flops)} per token, "
        f"{e['reference_step_share']:.0%} of each step's compute, counted above)"
    )


def _flops(n: float) -> str:
    return f"{n / 1e9:.1f} GFLOP" if n >= 1e8 else f"{n / 1e6:.2f} MFLOP"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
