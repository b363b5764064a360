"""`launcher run` / `prepare` / `status`: what happens on the machine where the command is typed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.plan import Plan


def prepare(plan: Plan) -> int:
    """Build the tiny model (in tiny mode) and the tokenised data cache, in this process."""
    from launcher.runtime.__main__ import main as runtime_main

    code = runtime_main(["--plan", plan.plan_path, "--prepare-only"])
    if code == 0:
        print(f"launcher: data prepared for {plan.run_dir}")
    return code


def run_local(plan: Plan) -> int:
    """Prepare, then run launch.sh (torchrun) here; stream its output; return its exit code."""
    if plan.topology["nodes"] != 1:
        print(
            f"error: cluster.nodes: {plan.topology['nodes']} nodes cannot run on this machine; "
            "use `launcher submit`, or override cluster.nodes=1",
            file=sys.stderr,
        )
        return 2
    code = prepare(plan)
    if code != 0:
        return code
    marker = Path(plan.run_dir) / "checkpoints" / "REQUEUE"
    exit_file = Path(plan.run_dir) / "logs" / "exit_code"
    marker.unlink(missing_ok=True)
    exit_file.unlink(missing_ok=True)
    launch = Path(plan.run_dir) / "launch.sh"
    print(f"launcher: {plan.topology['world_size']} process(es): bash {launch}", flush=True)
    done = subprocess.run(["bash", str(launch)], env=os.environ.copy())
    if done.returncode != 0 and exit_file.exists():
        # torchrun turns every worker failure into 1; rank 0 recorded what it meant (2 bad input, 75 saved on a signal).
        return int(exit_file.read_text().strip() or done.returncode)
    return done.returncode


def status(run_dir: str) -> int:
    """SLURM state of the run's last job (if any) and its last logged step."""
    folder = Path(run_dir)
    if not (folder / "plan.json").exists():
        print(f"error: {run_dir}: not a run directory (no plan.json)", file=sys.stderr)
        return 2
    job_file = folder / "logs" / "job_id"
    if job_file.exists() and shutil.which("scontrol"):
        job = job_file.read_text().strip()
        done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
        fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
        state = fields.get("JobState", "unknown (not known to slurmctld any more)")
        print(f"job {job}: {state}  restarts {fields.get('Restarts', '?')}  nodes {fields.get('NodeList', '?')}")
    metrics = folder / "metrics.jsonl"
    last = None
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                last = record
    if last is None:
        print("no step logged yet")
    else:
        print(f"step {last['step']}  loss {last['loss']:.4f}  lr {last['lr']:.2e}  elapsed {last['elapsed']:.0f}s")
    latest = folder / "checkpoints" / "latest"
    print(f"latest checkpoint: {os.readlink(latest) if latest.is_symlink() else 'none'}")
    return 0
