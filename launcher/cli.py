"""`launcher` command line: each subcommand parses its arguments and calls one function.

Exit codes: 0 success, 2 bad input (recipe, overrides, paths: nothing was written or launched),
75 the job stopped on a signal after saving (run it again to resume), else the job's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, RunConfig, load_config
from launcher.config.errors import Problem

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options too (`plan R --out D a.b=c`): collect the leftovers.
    args, extra = parser.parse_known_args(argv)
    bad = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Plan and launch LLM fine-tuning from one recipe.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("recipe", help="recipe YAML (a path, or a name under recipes/)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.max_steps=100")
        return cmd

    cmd = recipe_command("validate", "check a recipe and print the resolved batch settings")
    cmd.set_defaults(func=cmd_validate)
    cmd = recipe_command("estimate", "print the memory (per GPU, per node), checkpoint and step-time estimate; writes nothing")
    cmd.set_defaults(func=cmd_estimate)
    for name, func, help_text in (
        ("plan", cmd_plan, "write the run directory: plan.json, launch.sh, job.sbatch, deepspeed.json|fsdp.json"),
        ("submit", cmd_submit, "plan, then submit job.sbatch with sbatch (prints the job id)"),
        ("run", cmd_run, "plan, then run the ranks on this machine (GPUs, or CPU processes)"),
        ("prepare", cmd_prepare, "tokenise and pack the data once into the cache the ranks memory-map"),
    ):
        cmd = recipe_command(name, help_text)
        cmd.add_argument("--out", help="run directory (default: run.output_dir or runs/<run.name>)")
        cmd.add_argument("--force", action="store_true", help="write the run into a folder that holds other files")
        cmd.set_defaults(func=func)
        if name == "submit":
            cmd.add_argument("--dry-run", action="store_true", help="plan and print the sbatch command, submit nothing")

    cmd = recipe_command("preview", "the first prepared training examples, token by token, the trained ones marked")
    cmd.add_argument("-n", type=int, default=3, dest="count", help="how many examples (default 3)")
    cmd.add_argument("--json", action="store_true", help="JSON: the report and every token with its id, text and trained flag")
    cmd.set_defaults(func=cmd_preview)

    cmd = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model directory (safetensors)")
    cmd.add_argument("run_dir")
    cmd.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    cmd.add_argument("--best", action="store_true", help="the checkpoint early stopping recorded as best")
    cmd.add_argument("--out", required=True, help="output directory")
    cmd.add_argument("--merge", action="store_true", help="LoRA/QLoRA: merge the adapter into the base model")
    cmd.add_argument("--force", action="store_true", help="write into --out even if it already holds files")
    cmd.set_defaults(func=cmd_export)

    _tryout_commands(sub)

    cmd = sub.add_parser("doctor", help="check this machine for a recipe: torch, CUDA, kernels, extras, paths, port")
    cmd.add_argument("recipe", nargs="?", help="recipe YAML (optional: what it needs becomes required)")
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. cluster.accelerator=cpu")
    cmd.add_argument(
        "--nodes", type=int, metavar="N", help="submit a short job on N nodes that checks the allocation (all-reduce, shared dir, memory)"
    )
    cmd.add_argument("--dry-run", action="store_true", help="with --nodes: write and print the job's script, submit nothing")
    cmd.add_argument("--wait", type=float, default=1800, metavar="SECONDS", help="with --nodes: how long to wait for the job (1800)")
    cmd.set_defaults(func=cmd_doctor)

    cmd = sub.add_parser("plot", help="draw a run's loss.png (loss and learning rate) from its metrics.jsonl")
    cmd.add_argument("run_dir")
    cmd.add_argument("--out", help="PNG file to write (default: RUN_DIR/loss.png)")
    cmd.set_defaults(func=cmd_plot)

    cmd = sub.add_parser("status", help="a run's state (running, preempted, requeued, failed, done), job, step, checkpoint")
    cmd.add_argument("run_dir")
    cmd.set_defaults(func=cmd_status)
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.recipe, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    t = cfg.train
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    print(
        f"ok: {args.recipe}: {cfg.method.name} on {cfg.parallel.backend}, {cfg.cluster.nodes} node(s) x "
        f"{cfg.cluster.gpus_per_node} = {world} rank(s); batch {t.micro_batch_size} x {t.gradient_accumulation_steps} "
        f"x {world} = {t.global_batch_size}"
    )
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """The itemised estimate of a recipe (what estimate.txt holds), without planning a run directory."""
    from launcher.plan.backend import resolve_backend
    from launcher.plan.estimate import choose_micro_batch, estimate_plan, gpu_memory_gib, render_estimate
    from launcher.plan.estimate.memory import GIB
    from launcher.plan.topology import build_topology

    cfg, choice = resolve_backend(_load(args))
    candidates: dict[int, float] = {}
    if cfg.train.auto_micro_batch:
        cfg, candidates = choose_micro_batch(cfg)
    estimate = estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))
    print(
        f"{args.recipe}: {cfg.method.name} on {cfg.parallel.backend}, micro-batch {cfg.train.micro_batch_size} x {cfg.data.max_seq_len} tokens"
    )
    if choice.requested == "auto":
        print(f"backend: {choice.chosen} ({choice.reason})")
    print(render_estimate(estimate, candidates), end="")
    limit = gpu_memory_gib(cfg.cluster)
    if limit and estimate["total"] > limit * GIB:
        print(f"over: {estimate['total'] / GIB:.1f} GiB > {limit:g} GiB; `launcher plan` refuses this recipe", file=sys.stderr)
    return 0


def _newest_verifies(run_dir: Path) -> bool:
    """Whether the checkpoint a finished run would resume from reads back intact (each file's CRC-32,
    as the ranks check before loading it): only then is the run done. A manifest without checksums
    (an older one) cannot say so without loading it: the ranks load it (or fall back) as before."""
    from launcher.plan.resume import is_complete, read_manifest, resume_candidates

    found, _ = resume_candidates(run_dir / "checkpoints", "auto")
    return bool(found) and bool(read_manifest(found[0]).get("checksums")) and is_complete(found[0], verify=True)[0]


@contextlib.contextmanager
def _planned(
    args: argparse.Namespace, data: bool = False, stop_if_done: bool = False
) -> Iterator[Any]:  # -> Plan (imports lazy: `validate` needs no plan code)
    """Load, check everything (resume compatibility included), lock the run directory, then
    write it; the lock is held until the command ends. Nothing is written before that. With
    `data` (run, prepare, submit: they prepare the data anyway) the data cache is built first,
    so that a changed data set is refused before the run directory is touched too. With
    `stop_if_done` (run, submit) a run whose training is finished raises RunDone instead."""
    from launcher.config.values import check_run_dir
    from launcher.plan import build_plan, default_run_dir, write_run_dir
    from launcher.plan.backend import with_backend
    from launcher.plan.resume import check_resume
    from launcher.rerun import RunDone, check_changes, done_message, finished, previous_config
    from launcher.runfiles import foreign_folder
    from launcher.runlock import holding

    out = getattr(args, "out", None)
    if out is not None and check_run_dir(out, "--out"):
        raise ConfigError(check_run_dir(out, "--out"))
    if out is not None and os.path.islink(out.rstrip("/") or out):
        # a link to another run's folder would have this run rewrite that run's config.yaml and plan.json
        target = os.path.realpath(out)
        raise ConfigError(
            [Problem("--out", f"{out} is a symbolic link (to {target})", f"give the folder itself (--out {target}) or a new one")]
        )
    cfg = _load(args)
    run_dir = os.path.abspath(out) if out else default_run_dir(cfg)
    key = "--out" if out else "run.output_dir"
    problems = check_run_dir(run_dir, key)  # the working directory counts too
    foreign = None if problems or args.force else foreign_folder(Path(run_dir))
    if foreign is not None:  # its config.yaml, launch.sh, logs/ would be written over the files there
        problems = [Problem(f"{key} {run_dir}", foreign, "choose a new folder, or add --force to write the run into this one")]
    if problems:
        raise ConfigError(problems)
    plan = build_plan(cfg, run_dir)
    for line in plan.warnings:
        print(line, file=sys.stderr)
    cfg = with_backend(cfg, plan.config["parallel"]["backend"])  # auto resolved: what checkpoints record
    saved = check_resume(cfg, run_dir)  # the settings a checkpoint records first (its fix: checkpoint.allow_mismatch)
    # then every other one: a run directory that holds a training keeps the settings that made it (launcher/rerun.py)
    changes = check_changes(Path(run_dir), plan.config, cfg.checkpoint.allow_mismatch, key)
    if saved is not None and data:
        from launcher.runtime.__main__ import prepare as prepare_data
        from launcher.runtime.data import DataError
        from launcher.runtime.model.files import ModelError

        with contextlib.suppress(DataError, ModelError, OSError):  # reported by prepare() below, in its own words
            saved = check_resume(cfg, run_dir, data_fingerprint=prepare_data(cfg).name)
    why = finished(cfg, saved, previous_config(Path(run_dir))) if stop_if_done else None
    if why is not None and not _newest_verifies(Path(run_dir)):
        why = None  # the final checkpoint fails its checksums: the ranks fall back to an older one and train on
    if why is not None:  # nothing to start: the ranks would only evaluate the final weights again
        raise RunDone(done_message(Path(run_dir), why, cfg))
    for line in changes:
        print(line, file=sys.stderr)
    with holding(run_dir):
        write_run_dir(plan)
        yield plan


def cmd_plan(args: argparse.Namespace) -> int:
    with _planned(args) as plan:
        print(_summary(plan))
    again = f"{shlex.quote(args.recipe)}" + (f" --out {shlex.quote(plan.run_dir)}" if args.out else "")
    print(f"\nnext: launcher run {again}   (or: bash {shlex.quote(plan.run_dir)}/launch.sh)")
    print(f"      sbatch {shlex.quote(plan.run_dir)}/job.sbatch   (or: launcher submit {again})")
    return 0


def _summary(plan) -> str:  # plan: Plan
    from launcher.plan.torchrun import shell_join

    cfg, topo = plan.config, plan.topology
    mem = plan.estimate
    pairs = cfg["task"] == "preference"  # a row is a pair: two sequences, each up to max_seq_len
    rows = [
        ("run dir", plan.run_dir),
        ("model", f"{cfg['model']['name_or_path']} ({mem['params'] / 1e6:,.1f} M params)"),
        ("method", cfg["method"]["name"]),
        ("backend", _backend_line(plan)),
        ("ranks", f"{topo['nodes']} node(s) x {topo['procs_per_node']} = {topo['world_size']} ({cfg['cluster']['accelerator']})"),
        (
            "batch",
            f"{topo['micro_batch_size']} micro x {topo['gradient_accumulation_steps']} accum x {topo['data_parallel']} dp"
            f" = {topo['global_batch_size']} {'pairs' if pairs else 'seqs'} ({topo['tokens_per_step'] * (2 if pairs else 1):,} tokens max)",
        ),
        ("steps", str(cfg["train"]["max_steps"])),
        *([("reference", _reference_line(cfg, mem))] if cfg["task"] == "preference" else []),
        ("memory/GPU", _memory_line(mem)),
        ("collectives", f"time out after {plan.collective_timeout_seconds} s (cluster.collective_timeout_seconds)"),
        # launcher.agent is torchrun (torch.distributed.run) with the same arguments, minus its slow exit
        ("agent", f"{shell_join(plan.torchrun)}   (torchrun's agent: torch.distributed.run, launcher/agent.py)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _backend_line(plan) -> str:  # plan: Plan
    par, choice = plan.config["parallel"], plan.backend_choice
    line = par["backend"] + (f" ZeRO-{par['zero_stage']}" if plan.deepspeed else "")
    return line + (f" ({choice['reason']})" if choice.get("requested") == "auto" else "")


def _reference_line(cfg: dict[str, Any], mem: dict[str, float]) -> str:
    """A preference run's reference pass and what it costs (estimate.txt has the numbers)."""
    loss, flops = cfg["preference"]["loss"], mem.get("reference_flops_per_token", 0.0)
    if not flops:
        return f"none ({loss} is reference-free)"
    if mem.get("reference_stored"):
        share = flops / mem["flops_per_token"]
        return f"{loss}: computed once before step 1 (a forward of the first epoch, {share:.0%} of its training compute), stored beside the data"
    return (
        f"{loss}: the base with the adapters off, a forward of every micro-batch ({mem['reference_step_share']:.0%} of each step's compute)"
    )


def _memory_line(mem: dict[str, float]) -> str:
    from launcher.plan.plan import auto_candidates

    total, limit = mem["total"] / 1024**3, mem.get("gpu_memory_gib", 0.0)
    line = f"{total:.2f} GiB estimated" + (f", {total / limit:.0%} of {limit:g} GiB" if limit else "") + " (estimate.txt)"
    candidates = auto_candidates(mem)
    if candidates:
        line += "; auto micro-batch compared " + ", ".join(f"{m}: {v / 1024**3:.1f} GiB" for m, v in sorted(candidates.items()))
    return line


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.rerun import RunDone

    try:
        with _planned(args, data=not args.dry_run, stop_if_done=not args.dry_run) as plan:
            return _submit(args, plan)
    except RunDone as done:
        print(done)
        return 0


def _submit(args: argparse.Namespace, plan: Any) -> int:
    script = str(Path(plan.run_dir) / "job.sbatch")
    command = ["sbatch", "--parsable", script]
    if args.dry_run:
        print(_summary(plan))
        print("\ndry run, would submit: " + " ".join(shlex.quote(c) for c in command))
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch: not found on PATH; run on a SLURM login node, or use `launcher run` here", file=sys.stderr)
        return EXIT_BAD_INPUT
    from launcher.run_local import prepare

    # Tokenise once here, not on the ranks (a shared file system may not honour their file lock).
    code = prepare(plan)
    if code != 0:
        return code
    done = subprocess.run(command, cwd=plan.run_dir, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    from launcher.runfiles import replace_file

    replace_file(Path(plan.run_dir) / "logs" / "job_id", job_id + "\n")
    print(job_id)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.rerun import RunDone
    from launcher.run_local import run_local

    try:
        with _planned(args, data=True, stop_if_done=True) as plan:
            return run_local(plan)
    except RunDone as done:
        print(done)
        return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from launcher.run_local import prepare

    with _planned(args, data=True) as plan:
        return prepare(plan)


def cmd_preview(args: argparse.Namespace) -> int:
    from launcher.preview import preview

    if args.count < 1:
        raise ConfigError([Problem("-n", f"{args.count} examples", "give a count of 1 or more")])
    return preview(_load(args), args.count, args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.runtime.state.export import export_run

    return export_run(args.run_dir, args.out, step=args.step, merge=args.merge, best=args.best, force=args.force)


def _tryout_commands(sub: Any) -> None:
    """Try what a run trained: eval on any file, generate from a prompts file, chat (launcher/tryout.py, launcher/generate.py)."""
    cmd = sub.add_parser("eval", help="a checkpoint's metrics on a file (default: the run's validation set), as training evaluates")
    cmd.add_argument("run_dir")
    cmd.add_argument("--data", help="data file or saved data set, read with the run's template and columns (default: its validation set)")
    cmd.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    cmd.add_argument("--out", help="folder for eval.json and eval_predictions.jsonl (default: RUN/evals/<file>-step-N)")
    cmd.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda for a CUDA run where a GPU is present, else cpu")
    cmd.add_argument("--prompts", type=int, help="causal LM: held-out prompts scored by exact match (default: train.eval_exact_match)")
    cmd.set_defaults(func=cmd_eval)
    for name, help_text in (
        ("generate", "greedy answers to a prompts file (JSON lines), written as the run's data were, to JSONL"),
        ("chat", "talk to a checkpoint: a turn a line from stdin (a terminal or a pipe), the run's chat template"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("run_dir", help="run directory (or a folder `launcher export` wrote)")
        if name == "generate":
            cmd.add_argument("--prompts", required=True, help='one prompt a line: {"prompt": ...}, {"messages": [...]}, or plain text')
            cmd.add_argument("--out", help="JSONL file to write (default: stdout)")
        cmd.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
        cmd.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
        cmd.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where a GPU is present, else cpu")
        cmd.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)


def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.tryout import evaluate_run

    return evaluate_run(args.run_dir, args.data, args.step, args.out, args.device, args.prompts)


def cmd_generate(args: argparse.Namespace) -> int:
    from launcher.generate import generate_run

    return generate_run(args.run_dir, args.prompts, args.out, args.step, args.max_new_tokens, args.device)


def cmd_chat(args: argparse.Namespace) -> int:
    from launcher.generate import chat_run

    return chat_run(args.run_dir, args.step, args.max_new_tokens, args.device)


def cmd_doctor(args: argparse.Namespace) -> int:
    from launcher.doctor import doctor, doctor_nodes

    if args.nodes is not None:
        if not args.recipe or args.nodes < 1:
            print("error: --nodes N needs a recipe and N >= 1: launcher doctor RECIPE --nodes 2", file=sys.stderr)
            return EXIT_BAD_INPUT
        on_nodes = load_config(args.recipe, [*args.overrides, f"cluster.nodes={args.nodes}"])
        return doctor_nodes(on_nodes, args.recipe, dry_run=args.dry_run, wait_seconds=args.wait)
    cfg = load_config(args.recipe, args.overrides) if args.recipe else None
    return doctor(cfg, args.recipe or "")


def cmd_plot(args: argparse.Namespace) -> int:
    from launcher.plot import plot_run

    metrics = Path(args.run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics}: not found; give a run directory that `launcher run` has logged steps in", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        path = plot_run(args.run_dir, args.out)
    except ValueError as exc:
        print(f"error: {metrics}: {exc}; plot once the run has logged a step", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: {args.out or args.run_dir}: cannot write the plot ({exc.strerror}); choose a writable --out", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"launcher: plot {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from launcher.run_local import status

    return status(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
