"""GPU benchmark: an 8B-shaped Llama cut to a few layers, one GPU, bf16; training tokens/s and MFU
for FlashAttention vs our per-document SDPA, packed vs padded rows, fused vs plain cross-entropy,
compile on/off. Not a test; prints a Markdown table for tests/bench/RESULTS.md; exits 0 with a
note when there is no CUDA.

    .venv/bin/python tests/bench/bench_gpu.py [--layers 2 --seq 4096 --micro-batch 2 --steps 10]

Documents of 64-2048 tokens (seeded) are packed into rows of --seq tokens (packed: the launcher's
packing contract, kernels.attention.model_inputs) or given one per row padded to the longest
(padded: a [documents, longest] batch with a 2-D padding mask, as a padded trainer runs). The same
documents feed every case, so tokens/s counts the same real tokens. MFU = model FLOPs per real token
(6 x non-embedding parameters + 6 x vocab x hidden for the head + 12 x layers x hidden x the
documents' mean attended length) x tokens/s / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from typing import Any

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def documents(total_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) + (n := rng.randint(64, 2048)) <= total_tokens:
        lengths.append(n)
    return lengths


def pack_rows(lengths: list[int], seq: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for n in sorted(lengths, reverse=True):  # first fit decreasing: a benchmark needs no shuffle
        for row in rows:
            if sum(row) + n <= seq:
                row.append(n)
                break
        else:
            rows.append([min(n, seq)])
    return rows


def build(args: argparse.Namespace, implementation: str, compile_blocks: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=torch.bfloat16)
    if compile_blocks:  # per block, as torchtitan does
        for layer in model.model.layers:
            layer.compile()
    return model


def batches(args: argparse.Namespace, layout: str, step: int) -> list[dict[str, Any]]:
    """The micro-batches of one step: the same documents, grouped the same way, in both layouts."""
    import torch

    rows = pack_rows(documents(args.seq * args.micro_batch * args.accumulation, seed=step), args.seq)
    gen = torch.Generator().manual_seed(step)
    out = []
    for group in (rows[i : i + args.micro_batch] for i in range(0, len(rows), args.micro_batch)):
        real = sum(map(sum, group))
        if layout == "padded":  # one document per row, padded to the longest
            chunk = [n for row in group for n in row]
            longest = max(chunk)
            ids = torch.randint(0, 128256, (len(chunk), longest), generator=gen)
            mask = (torch.arange(longest)[None] < torch.tensor(chunk)[:, None]).long()
            out.append({"ids": ids, "labels": torch.where(mask.bool(), ids, -100), "mask": mask, "real": real})
            continue
        ids = torch.randint(0, 128256, (len(group), args.seq), generator=gen)
        positions = torch.arange(args.seq).repeat(len(group), 1)
        labels = torch.full((len(group), args.seq), -100)
        for i, row in enumerate(group):
            used = sum(row)
            positions[i, :used] = torch.cat([torch.arange(n) for n in row])
            positions[i, used:] = torch.arange(args.seq - used)
            labels[i, :used] = ids[i, :used]
        out.append({"ids": ids, "labels": labels, "positions": positions, "real": real})
    return out


def step_loss(model: Any, batch: dict[str, Any], implementation: str, loss_kind: str) -> Any:
    import torch
    import torch.nn.functional as F
    from launcher.kernels.attention import IGNORE_INDEX, model_inputs
    from launcher.kernels.loss import head_loss

    cuda = torch.device("cuda")
    if "mask" in batch:
        kwargs = {"input_ids": batch["ids"].to(cuda), "attention_mask": batch["mask"].to(cuda), "use_cache": False}
        targets = torch.cat([batch["labels"][:, 1:], torch.full((len(batch["ids"]), 1), IGNORE_INDEX)], 1).reshape(-1).to(cuda)
    else:
        kwargs, targets = model_inputs(batch["ids"], batch["labels"], batch["positions"], implementation, device=cuda)
    if loss_kind == "plain":
        logits = model(**kwargs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with head_loss(model, targets, loss_kind) as take:
        return take(model(**kwargs))


def flops_per_token(model: Any, lengths_sq_over_len: float) -> float:
    config = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    head = config.vocab_size * config.hidden_size
    return 6.0 * (params + head) + 12.0 * config.num_hidden_layers * config.hidden_size * lengths_sq_over_len


def run_case(args: argparse.Namespace, model: Any, implementation: str, layout: str, loss_kind: str) -> dict[str, float]:
    import torch

    model.config._attn_implementation = implementation
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    torch.cuda.reset_peak_memory_stats()
    timed_tokens, timed_seconds = 0, 0.0
    for step in range(args.warmup + args.steps):
        micro = batches(args, layout, step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in micro:
            step_loss(model, batch, implementation, loss_kind).div(max(1, batch["real"])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            timed_seconds += time.perf_counter() - start
            timed_tokens += sum(b["real"] for b in micro)
    lengths = [
        n for s in range(args.warmup, args.warmup + args.steps) for n in documents(args.seq * args.micro_batch * args.accumulation, s)
    ]
    attended = sum(n * n for n in lengths) / sum(lengths)
    tokens_per_s = timed_tokens / timed_seconds
    del optimizer
    return {
        "tokens_per_s": tokens_per_s,
        "flops": flops_per_token(model, attended) * tokens_per_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", nargs="+", default=["flash_attention_2", "launcher_varlen", "launcher_sdpa"])
    parser.add_argument("--layouts", nargs="+", default=["packed", "padded"])
    parser.add_argument("--losses", nargs="+", default=["fused", "plain"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not in the table")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured")
        return
    from launcher.kernels.attention import attn_implementation, has_flash_attn
    from launcher.kernels.liger import has_liger

    attn_implementation("sdpa", "cuda")  # registers launcher_sdpa
    from launcher.kernels import varlen

    if varlen.available():
        varlen.register()  # launcher_varlen: torch's varlen kernel, one call per layer
    else:
        args.attention = [a for a in args.attention if a != "launcher_varlen"]
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    fused = "liger" if has_liger() else "chunked"
    print(f"{name}; {args.layers} layers of Llama-3-8B shape, bf16, seq {args.seq}, micro-batch {args.micro_batch}; fused loss = {fused}")
    print("| attention | rows | loss | compile | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---:|---:|---:|")
    for compiled, implementation in itertools.product(args.compile, args.attention):
        if implementation.startswith("flash") and not has_flash_attn():
            print(f"| {implementation} | - | - | {compiled} | not installed | | |")
            continue
        model = build(args, implementation, compiled == "on")
        for layout, loss in itertools.product(args.layouts, args.losses):
            kind = fused if loss == "fused" else "plain"
            try:
                r = run_case(args, model, implementation, layout, kind)
            except torch.OutOfMemoryError:
                print(f"| {implementation} | {layout} | {kind} | {compiled} | out of memory | | |")
                torch.cuda.empty_cache()
                continue
            mfu = f"{100 * r['flops'] / (peak * 1e12):.1f} %" if peak else "n/a"
            print(
                f"| {implementation} | {layout} | {kind} | {compiled} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.1f} |",
                flush=True,
            )
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
