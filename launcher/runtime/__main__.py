"""The per-rank orchestrator: `python -m launcher.runtime --plan RUN/plan.json` (torchrun runs it).

Step order: plan → process group → seeds → tokenizer and prepared data → model (meta → method →
shard → load) → optimizer → resume → loop (checkpoint, eval, signals) → final save → teardown.
Exit codes: 0 done, 2 bad input, 75 saved after a signal (run again to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.plan import Plan
from launcher.plan.slurm import REQUEUE_EXIT_CODE

EXIT_FAILURE, EXIT_BAD_INPUT = 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.runtime")
    parser.add_argument("--plan", required=True, help="RUN_DIR/plan.json written by `launcher plan`")
    parser.add_argument("--prepare-only", action="store_true", help="build the tiny model and data cache, then exit")
    args = parser.parse_args(argv)
    plan = Plan.load(args.plan)
    cfg = plan.run_config

    from launcher.runtime.checkpoint import CheckpointError
    from launcher.runtime.data import DataError
    from launcher.runtime.model import ModelError

    if args.prepare_only:
        try:
            prepare(cfg)
        except (DataError, ModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0

    import os
    import socket

    from launcher.runtime.dist import init_distributed, teardown
    from launcher.runtime.signals import StopFlag

    # Catch USR1/TERM from the first moment: a preemption while a large model loads must not be lost.
    stop = StopFlag()
    stop.install()
    info = init_distributed(cfg.cluster.accelerator)
    # One write call: the ranks share one pipe, and print() writes the newline separately.
    host = socket.gethostname()
    sys.stdout.write(f"launcher: rank {info.rank} of {info.world_size} (local {info.local_rank}) on {host}, pid {os.getpid()}\n")
    sys.stdout.flush()
    code = EXIT_FAILURE
    try:
        code = run(plan, cfg, info, stop)
    except (DataError, ModelError, CheckpointError) as exc:
        if info.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    finally:
        if info.is_main:  # torchrun reports any failure as 1; `launcher run` reads the real code here
            (Path(plan.run_dir) / "logs").mkdir(exist_ok=True)
            (Path(plan.run_dir) / "logs" / "exit_code").write_text(f"{code}\n")
        teardown(synchronise=code in (0, EXIT_BAD_INPUT, REQUEUE_EXIT_CODE))
    return code


def prepare(cfg: RunConfig) -> Path:
    """Tiny model (if asked for) and the tokenised, packed data cache; returns the cache folder."""
    from launcher.runtime.model import model_dir
    from launcher.runtime.packing import prepare_data
    from launcher.runtime.tiny import TASKS_NAME, cache_dir, ensure_tiny_tasks

    path = model_dir(cfg.model)
    source = str(ensure_tiny_tasks()) if cfg.data.path == TASKS_NAME else cfg.data.path
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else cache_dir() / "data"
    return prepare_data(cfg.data, source, path, cache_root, cfg.run.seed)


def run(plan: Plan, cfg: RunConfig, info: Any, stop: Any) -> int:
    from launcher.kernels.attention import attn_implementation
    from launcher.runtime import checkpoint as ckpt
    from launcher.runtime.build import build_training_model
    from launcher.runtime.dist import seed_everything
    from launcher.runtime.loop import Context, train
    from launcher.runtime.metrics import Reporter, plot_losses
    from launcher.runtime.model import load_tokenizer, model_dir
    from launcher.runtime.packing import GlobalOrder, TokenData

    seed_everything(cfg.run.seed)
    run_dir = Path(plan.run_dir)
    path = model_dir(cfg.model)
    tokenizer = load_tokenizer(path)
    folder = prepare(cfg)
    train_data, val_data = TokenData(folder, "train"), TokenData(folder, "val")
    eval_prompts = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    impl = attn_implementation(cfg.kernels.attention, info.device.type)
    built = build_training_model(plan, cfg, info, path, impl)

    saver = built.saver(run_dir / "checkpoints", info, cfg.checkpoint)
    now = {
        "data_fingerprint": folder.name,
        "global_batch_size": cfg.train.global_batch_size,
        "seed": cfg.run.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "method": cfg.method.name,
        "backend": cfg.parallel.backend,
    }
    start_step, tokens_seen = 0, 0.0
    if cfg.checkpoint.resume == "never" and ckpt.find_resume(run_dir / "checkpoints", "auto", warn=False) is not None:
        # Starting over here would mix two runs' checkpoints, and retention could delete the new ones.
        raise ckpt.CheckpointError(
            f"checkpoint.resume: never, but {run_dir / 'checkpoints'} holds an earlier run's checkpoints; "
            "resume them (checkpoint.resume=auto), write elsewhere (--out or run.output_dir), or delete them"
        )
    resume_from = ckpt.find_resume(run_dir / "checkpoints", cfg.checkpoint.resume, warn=info.is_main)
    if resume_from is not None:
        saved = built.load(resume_from, info.rank)
        changed = ckpt.compare_manifest(saved, now, cfg.checkpoint.allow_mismatch)
        start_step, tokens_seen = int(saved["step"]), float(saved.get("tokens_seen", 0.0))
        if info.is_main:
            moved = f" (saved at world size {saved['world_size']}, now {info.world_size})" if saved["world_size"] != info.world_size else ""
            print(f"launcher: resuming from {resume_from} at step {start_step}{moved}", flush=True)
            for line in changed:
                print(f"warning: checkpoint.allow_mismatch: {line}", file=sys.stderr, flush=True)

    reporter = Reporter(run_dir, info.is_main, cfg.train.max_steps, start_step)
    ctx = Context(
        cfg=cfg,
        info=info,
        model=built.model,
        optimizer=built.optimizer,
        train_data=train_data,
        val_data=val_data,
        order=GlobalOrder(len(train_data), cfg.run.seed),
        attn_implementation=impl,
        reporter=reporter,
        backend=cfg.parallel.backend,
        eval_prompts=eval_prompts,
        tokenizer=tokenizer,
        engine=built.engine,
        tokens_seen=tokens_seen,
    )
    topology = plan.topology
    stopped = False

    def on_step_end(step: int) -> bool:
        nonlocal stopped
        # A signal during the last step needs no requeue: the run is finishing anyway.
        stopped = stop.agreed(info.device) and step < cfg.train.max_steps
        saver.poll()
        every = cfg.checkpoint.every
        if stopped or (every and step % every == 0) or step == cfg.train.max_steps:
            manifest = {
                **now,
                "step": step,
                "samples": step * (cfg.train.global_batch_size or 0),
                "tokens_seen": ctx.tokens_seen,
                "world_size": info.world_size,
                "micro_batch_size": topology["micro_batch_size"],
                "gradient_accumulation_steps": topology["gradient_accumulation_steps"],
                "parallel": plan.fsdp["mesh"] if plan.fsdp else {"zero_stage": cfg.parallel.zero_stage},
            }
            saved_to = saver.save(built.model, built.optimizer, manifest)
            if stopped:
                saver.wait()
                if info.is_main:
                    (run_dir / "checkpoints" / "REQUEUE").write_text(saved_to.name + "\n")
                    reporter.print(f"launcher: saved {saved_to} after a signal; exiting with {REQUEUE_EXIT_CODE} (run again to resume)")
        return stopped

    try:
        train(ctx, start_step, on_step_end)
        saver.wait()
    finally:
        reporter.close()
    if stopped:
        return REQUEUE_EXIT_CODE
    if info.is_main:
        plot_losses(reporter.path, run_dir / "loss.png")
        print(f"launcher: done. metrics {reporter.path}, plot {run_dir / 'loss.png'}, checkpoints {run_dir / 'checkpoints'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
