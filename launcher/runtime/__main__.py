"""The per-rank orchestrator: `python -m launcher.runtime --plan RUN/plan.json` (`launcher run` or torchrun starts it).

Step order: plan → process group → seeds → prepared data → model (meta → method → shard → load) →
optimizer → resume → loop (checkpoint, eval, signals) → final save → teardown. The tokenizer is read
only where text is (generation at an evaluation), at its first use; the garbage collector is off
until the loop starts (start-up only builds objects that live for the whole run).
Exit codes: 0 done, 2 bad input, 75 saved after a signal (run again to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.plan import Plan
from launcher.plan.slurm import REQUEUE_EXIT_CODE
from launcher.runfiles import replace_file

EXIT_FAILURE, EXIT_BAD_INPUT = 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.runtime")
    parser.add_argument("--plan", required=True, help="RUN_DIR/plan.json written by `launcher plan`")
    parser.add_argument("--prepare-only", action="store_true", help="build the tiny model and data cache, then exit")
    args = parser.parse_args(argv)
    if not args.prepare_only:
        from launcher.ranks import die_with_supervisor

        die_with_supervisor()  # before anything slow: a `launcher run` killed now must not leave this rank behind
    from launcher.config.errors import ConfigError

    try:
        plan = Plan.load(args.plan)
        cfg = plan.run_config
    except ConfigError as exc:  # not a regular file, or a plan.json edited into an invalid config
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT

    from launcher.runlock import RunDirBusy
    from launcher.runtime.data import DataError
    from launcher.runtime.model.files import ModelError

    if args.prepare_only:  # no torch here (unless a DeepSpeed op must be compiled): a warm cache answers in well under a second
        from launcher.runtime.train.signals import Stopped, stop_at_once

        try:
            with stop_at_once():  # USR1 / TERM now (time limit, preemption): exit 75, and job.sbatch requeues
                prepare(cfg, Path(plan.run_dir))
                from launcher.runtime.parallel.zero_ops import prebuild_ops

                built = prebuild_ops(plan.deepspeed)
            if built:
                print(built, flush=True)
        except Stopped as stopped:
            print(
                f"launcher: received {stopped} while preparing the data; stopped (run again to prepare again)", file=sys.stderr, flush=True
            )
            return REQUEUE_EXIT_CODE
        except (DataError, ModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as exc:  # ENOSPC, EROFS, EACCES writing the data cache or the tiny model
            where = exc.filename or cfg.data.cache_dir or "the data cache"
            print(
                f"error: {where}: cannot write ({exc.strerror}); free some space, or set data.cache_dir to a writable folder",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        return 0

    import os
    import socket

    # Start-up allocates millions of objects that live for the whole run (torch's and transformers'
    # modules, the model): the cyclic collector would scan them again and again while they are made,
    # about a sixth of the import time (measured on 2 CPUs). run() turns it back on before step 1.
    gc.disable()
    from launcher.runtime.parallel.dist import init_distributed, quiet_warnings, teardown, write_error_file
    from launcher.runtime.state.checkpoint import CheckpointError, write_exit_code
    from launcher.runtime.train.signals import STOP_SIGNALS, StopFlag

    # Catch USR1/TERM/INT from the first moment: a preemption while a large model loads must not be lost.
    stop = StopFlag()
    stop.install()
    import signal

    # Forked by rank 0 (launcher/zygote.py), the stop signals were blocked until now: one held meanwhile arrives here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    quiet_warnings()
    cpu_offload = cfg.parallel.backend == "fsdp" and cfg.parallel.fsdp.cpu_offload
    info = init_distributed(cfg.cluster.accelerator, cpu_offload, plan.collective_timeout_seconds or None)
    # One write call: the ranks share one pipe, and print() writes the newline separately.
    host = socket.gethostname()
    sys.stdout.write(f"launcher: rank {info.rank} of {info.world_size} (local {info.local_rank}) on {host}, pid {os.getpid()}\n")
    sys.stdout.flush()
    if info.is_main:  # a package outside the tested range (or not the one planned with): one line each
        from launcher.versions import warnings_for

        for line in warnings_for(plan.versions):
            print(line, file=sys.stderr, flush=True)
    code, owner = EXIT_FAILURE, True
    try:
        code = run(plan, cfg, info, stop)
    except (DataError, ModelError, CheckpointError) as exc:
        owner = not isinstance(exc, RunDirBusy)  # another run owns the directory: write nothing into it
        if info.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            if owner:
                with contextlib.suppress(OSError):  # a full disk must not turn this one line into a traceback
                    write_error_file(Path(plan.run_dir) / "logs", info.rank, exc)
        code = EXIT_BAD_INPUT
    except Exception as exc:  # the traceback still prints; the file gives `launcher run` its one line
        write_error_file(Path(plan.run_dir) / "logs", info.rank, exc)
        raise
    finally:
        gc.enable()  # on any way out, for a caller in the same process (tests)
        if info.is_main and owner:  # torchrun reports any failure as 1; `launcher run` reads the real code here
            write_exit_code(Path(plan.run_dir) / "logs", code)
        teardown(synchronise=code in (0, EXIT_BAD_INPUT, REQUEUE_EXIT_CODE))
    return code


def preload(argv: list[str]) -> None:
    """What every rank imports, imported once by rank 0's interpreter before it forks the others
    (launcher/zygote.py): torch and its distributed package, transformers with this plan's model
    code, peft / bitsandbytes / DeepSpeed where the plan uses them, and this runtime. Imports only:
    nothing here may start a thread or touch CUDA. A plan that does not load is left to main()."""
    import importlib

    gc.disable()  # as main() does: the collector would scan the imports' objects again and again
    from launcher.config.errors import ConfigError

    try:
        cfg = Plan.load(argv[argv.index("--plan") + 1]).run_config
    except (ConfigError, ValueError, IndexError):
        return
    from launcher.runtime.model.build import skip_unused_imports

    skip_unused_imports()  # before transformers' first import
    for name in (
        "torch",
        "torch.distributed",
        "torch.distributed.fsdp",
        "torch.distributed.checkpoint",
        "transformers",
        "launcher.runtime.parallel.dist",
        "launcher.runtime.parallel.backends",
        "launcher.runtime.state.checkpoint",
        "launcher.runtime.train.loop",
        "launcher.runtime.train.tasks",
        "launcher.runtime.train.metrics",
        "launcher.kernels.attention",
        *(["peft"] if cfg.method.peft else []),
        *(["bitsandbytes"] if cfg.method.name == "qlora" else []),
        *(["deepspeed"] if cfg.parallel.backend == "deepspeed" else []),
        *(["launcher.runtime.train.preference"] if cfg.task == "preference" else []),
    ):
        importlib.import_module(name)
    arch = cfg.model.architecture
    if arch and arch.isidentifier():  # the model's own code (transformers.models.llama.modeling_llama, ...)
        with contextlib.suppress(ImportError):
            importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    gc.freeze()  # shared with the forked ranks, never copied by a collection


def prepare(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Tiny model (if asked for) and the tokenised, packed data cache; returns the cache folder.
    With `run_dir` (prepare, run, submit): print the cleaning report and write it there."""
    from launcher.runtime.data.packing import prepare_data
    from launcher.runtime.data.report import lines
    from launcher.runtime.model.files import model_dir
    from launcher.runtime.model.tiny import cache_dir, shipped_data

    path = model_dir(cfg.model)
    shipped = shipped_data(cfg.data.path)
    source = str(shipped) if shipped is not None else cfg.data.path
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else cache_dir() / "data"
    folder = prepare_data(cfg.data, source, path, cache_root, cfg.run.seed, cfg.task)
    if run_dir is not None:
        meta = json.loads((folder / "meta.json").read_text())
        report = {k: meta[k] for k in ("sources", "train", "val") if k in meta}
        replace_file(run_dir / "data_report.json", json.dumps({**report, "cache": str(folder)}, indent=2) + "\n")
        print("\n".join(lines(meta)), flush=True)
    return folder


def run(plan: Plan, cfg: RunConfig, info: Any, stop: Any) -> int:
    from launcher.config.resolve import resolve_schedule
    from launcher.kernels.attention import attn_implementation
    from launcher.plan.resume import schedule_note
    from launcher.runtime.data.packing import GlobalOrder, TokenData
    from launcher.runtime.model.build import LazyTokenizer, skip_unused_imports
    from launcher.runtime.model.files import model_dir
    from launcher.runtime.parallel.backends import build_training_model
    from launcher.runtime.parallel.dist import raise_for_test, seed_everything
    from launcher.runtime.state import checkpoint as ckpt
    from launcher.runtime.train.loop import Context, EarlyStopper, train
    from launcher.runtime.train.metrics import Reporter, mfu_per_token_s
    from launcher.runtime.train.tasks import build_task
    from launcher.runtime.train.trackers import open_trackers

    seed_everything(cfg.run.seed)
    run_dir = Path(plan.run_dir)
    # Rank 0 owns the run directory (the lock) and decides what to resume from, before any work.
    candidates = ckpt.decide(run_dir / "checkpoints", cfg.checkpoint.resume, info)
    path = model_dir(cfg.model)
    tokenizer = LazyTokenizer(path) if cfg.train.eval_exact_match else None  # only generation reads text
    skip_unused_imports()  # before the first transformers import below
    folder = prepare(cfg)
    train_data, val_data = TokenData(folder, "train"), TokenData(folder, "val")
    labels = json.loads((folder / "meta.json").read_text()).get("labels")
    if labels and info.is_main:  # the label map belongs to the run (export writes it into config.json)
        replace_file(run_dir / "labels.json", json.dumps(labels) + "\n")
    cfg = resolve_schedule(cfg, len(train_data))  # epochs, warmup ratio, per-epoch intervals: from the prepared rows
    eval_prompts = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    impl = attn_implementation(
        cfg.kernels.attention, info.device.type, softcap=cfg.model.attn_logit_softcapping is not None, half=cfg.train.precision != "fp32"
    )
    built = build_training_model(plan, cfg, info, path, impl, labels)
    task = build_task(cfg.task, labels, cfg.preference, cfg.method.name)
    if cfg.task == "preference":  # before any checkpoint loads: the model is still the reference
        from launcher.runtime.train.preference import reference_context, reference_key, store_reference

        where = reference_context(cfg, info, built.model, train_data, val_data, impl)
        store_reference(task, where, folder, reference_key(cfg, path, impl))

    saver = built.saver(run_dir / "checkpoints", info, cfg.checkpoint)
    now = {
        "data_fingerprint": folder.name,
        "global_batch_size": cfg.train.global_batch_size,
        "seed": cfg.run.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "method": cfg.method.name,
        "backend": cfg.parallel.backend,
        "task": cfg.task,
    }
    now["max_steps"] = cfg.train.max_steps  # recorded, not compared: a change is announced below
    start_step, tokens_seen = 0, 0.0
    found = ckpt.load_first(candidates, built.load, info)  # falls back past a checkpoint that fails
    if found is not None:
        resume_from, saved = found
        changed = ckpt.compare_manifest(saved, now, cfg.checkpoint.allow_mismatch)
        start_step, tokens_seen = int(saved["step"]), float(saved.get("tokens_seen", 0.0))
        if info.is_main:
            moved = f" (saved at world size {saved['world_size']}, now {info.world_size})" if saved["world_size"] != info.world_size else ""
            print(f"launcher: resuming from {resume_from} at step {start_step}{moved}", flush=True)
            for line in changed:
                print(f"warning: checkpoint.allow_mismatch: {line}", file=sys.stderr, flush=True)
            note = schedule_note(saved, cfg)
            if note:
                print(f"warning: {note}", file=sys.stderr, flush=True)
            ckpt.cut_metrics(run_dir / "metrics.jsonl", start_step)

    max_steps = cfg.train.max_steps or 0  # resolve_schedule filled it
    if info.is_main and cfg.train.epochs is not None and start_step == 0:
        print(f"launcher: {cfg.train.epochs:g} epoch(s) of {len(train_data)} rows = {max_steps} steps", flush=True)
    trackers = open_trackers(cfg.train.report_to, run_dir, plan.config, start_step) if info.is_main and cfg.train.report_to else None
    mfu = mfu_per_token_s(plan.estimate, info.world_size, cfg.cluster.accelerator == "cuda")
    reporter = Reporter(run_dir, info.is_main, max_steps, start_step, trackers, mfu)
    stopping = cfg.train.early_stopping
    stopper = EarlyStopper(stopping.metric, stopping.mode, stopping.patience, stopping.threshold) if stopping.metric else None
    if stopper is not None and found is not None:
        stopper.restore(found[1].get("early_stopping", {}))
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
        task=task,
        stopper=stopper,
        stop=stop,
    )
    topology = plan.topology
    stopped = early = False

    def signal_saved(folder: Path, note: str) -> None:
        """checkpoints/REQUEUE names the signal save (job.sbatch requeues on it), and one line says so."""
        if info.is_main:
            replace_file(run_dir / "checkpoints" / "REQUEUE", folder.name + "\n")
            reporter.print(f"launcher: saved {folder} after a signal; exiting with {REQUEUE_EXIT_CODE} ({note})")

    def on_step_end(step: int) -> bool:
        nonlocal stopped, early
        # A signal during the last step needs no requeue: the run is finishing anyway.
        stopped = stop.agreed(info.device, fresh=ctx.evaluated is not None) and step < max_steps
        early = stopper is not None and ctx.evaluated is not None and stopper.should_stop
        saver.poll()  # agreed on every rank: a save still in flight here is in flight everywhere
        pending = saver.in_flight()
        if stopped and pending is not None:
            # An asynchronous save began less than one save's time ago: redoing the steps since costs
            # less than a second save inside the signal window. It counts as the signal save.
            saver.wait()
            signal_saved(pending, f"the save in flight when the signal came counts; run again to resume at {pending.name}")
            return True
        every = cfg.checkpoint.every
        # With early stopping every evaluation is saved, so the best one can be exported.
        at_eval = stopper is not None and ctx.evaluated is not None
        if stopped or early or at_eval or (every and step % every == 0) or step == max_steps:
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
            if stopper is not None:
                manifest["early_stopping"] = stopper.state()
            save_started = time.monotonic()
            saved_to = saver.save(built.model, built.optimizer, manifest)
            if stopped:
                saver.wait()
                took = time.monotonic() - save_started  # what a signal window must cover (cluster.signal_seconds)
                signal_saved(saved_to, f"run again to resume; the save took {took:.1f} s")
        raise_for_test(step, info.rank, info.world_size)  # LAUNCHER_TEST_RAISE_AT_STEP, after the save
        if early and info.is_main:
            reporter.print(
                f"launcher: early stopping at step {step}: {stopper.metric} has not improved for {stopper.patience} evaluation(s); "  # type: ignore[union-attr]
                f"best {stopper.best:.4f} at step {stopper.best_step}"  # type: ignore[union-attr]
            )
        return stopped or early

    # What start-up built stays: kept out of every later collection (gc.freeze), the collector on again.
    gc.freeze()
    gc.enable()
    try:
        train(ctx, start_step, on_step_end)
        saver.wait()
    finally:
        reporter.close()
    if stopped:
        return REQUEUE_EXIT_CODE
    if info.is_main:
        # loss.png is drawn by `launcher run` once the ranks have exited (launcher/plot.py)
        print(f"launcher: done. metrics {reporter.path}, checkpoints {run_dir / 'checkpoints'}", flush=True)
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: with torch, transformers and datasets loaded it takes
    2-10 s per rank (measured on 2 CPUs), after every save, log and process group is already closed."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
