"""Benchmark: tokens/s of `launcher run` on the tiny recipe against the Hugging Face Trainer on the
same model, data, global batch, learning rate and seed (Trainer: unpacked, padded to the longest
example of each batch; DDP over gloo), both measured in one run. Not a test.

    .venv/bin/python tests/bench/bench_throughput.py [--steps 60]

Counts real (non-padding) tokens for both; padding waste = padding / all tokens processed.
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

ROOT = Path(__file__).resolve().parents[2]


def hf_worker(args: argparse.Namespace) -> None:
    """One rank of the Trainer baseline (run under torchrun)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from launcher.config import load_config
    from launcher.runtime.data import CleanReport, clean, load_records, tokenize
    from launcher.runtime.tiny import ensure_tiny_model, ensure_tiny_tasks

    cfg = load_config(ROOT / "recipes" / "tiny-cpu.yaml")
    path = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = clean(load_records(str(ensure_tiny_tasks()), "auto", "train"), cfg.data, CleanReport())
    examples = [tokenize(r, cfg.data, tokenizer) for r in records]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    counts = {"real": 0, "padded": 0}
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += int(batch["attention_mask"].numel())
        return batch

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    t = cfg.train
    training = TrainingArguments(
        output_dir=args.dir,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // (t.micro_batch_size * world),
        max_steps=args.steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2,
        warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=cfg.optim.max_grad_norm,
        seed=cfg.run.seed,
        use_cpu=True,
        ddp_backend="gloo",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=counting_collator)
    begin = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - begin
    totals = torch.tensor([counts["real"], counts["padded"]], dtype=torch.float64)
    dist.all_reduce(totals)
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {"real": totals[0].item(), "padded": totals[1].item(), "train_runtime": result.metrics["train_runtime"], "elapsed": elapsed}
            )
        )


def run_ours(steps: int, out: Path) -> dict[str, float]:
    begin = time.perf_counter()
    command = [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", f"train.max_steps={steps}", "train.log_every=1"]
    command += ["train.eval_batches=0", "train.eval_exact_match=0", "checkpoint.every=0", "checkpoint.resume=never", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - begin
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    step_seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    real = sum(r["tokens"] for r in records)
    pads = sum(r["pad_tokens"] for r in records)
    return {"real": real, "padded": real + pads, "train_runtime": step_seconds, "wall": wall, "final_loss": records[-1]["loss"]}


def run_trainer(steps: int, out: Path) -> dict[str, float]:
    begin = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--hf-worker"]
    command += ["--steps", str(steps), "--dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    result["wall"] = time.perf_counter() - begin
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dir", default="")
    parser.add_argument("--hf-worker", action="store_true")
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args.steps, Path(tmp) / "ours")
        theirs = run_trainer(args.steps, Path(tmp) / "hf")
    rows = []
    for name, r in (("launcher (FSDP2, packed)", ours), ("HF Trainer (DDP, padded)", theirs)):
        rate = r["real"] / r["train_runtime"]
        waste = 1 - r["real"] / r["padded"]
        rows.append((name, rate, waste, r["train_runtime"], r["wall"]))
        print(
            f"{name:26s} {rate:9.0f} real tokens/s  padding {100 * waste:5.1f} %  train {r['train_runtime']:6.1f} s  wall {r['wall']:6.1f} s"
        )
    print(f"ratio (real tokens/s, ours / Trainer): {rows[0][1] / rows[1][1]:.2f}x over {args.steps} steps of 16 sequences")


if __name__ == "__main__":
    main()
