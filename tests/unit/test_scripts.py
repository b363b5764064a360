"""Generated shell scripts: shellcheck-clean, `bash -n`-clean, and recipe values stay data."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from launcher.config import load_config
from launcher.plan import build_plan, write_run_dir

ROOT = Path(__file__).resolve().parents[2]
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")

VARIANTS = [
    ("tiny-cpu.yaml", []),
    ("tiny-cpu.yaml", ["cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.requeue=false", "cluster.signal_seconds=0"]),
    ("llama3-70b-qlora-fsdp.yaml", ["cluster.partition=gpu", "cluster.account=proj-1", "cluster.qos=high", "cluster.constraint=h100&ib"]),
    ("llama3-8b-full-fsdp.yaml", ["cluster.rdzv_port=29400", "cluster.env={NCCL_IB_HCA: mlx5, HF_HOME: /data/hf}"]),
    # the network presets and NUMA binding (plan/network.py, torchrun --numa-binding)
    ("llama3-8b-full-fsdp.yaml", ["cluster.nodes=2", "cluster.network=ib", "cluster.ib_hca=^mlx5_4", "cluster.numa_binding=node"]),
    ("llama3-8b-qlora.yaml", ["cluster.network=efa", "cluster.gpu=h100-80gb", "cluster.socket_ifname=^docker,lo"]),
    ("llama3-8b-qlora.yaml", ["cluster.network=socket", "cluster.socket_ifname==eth0", "cluster.env={PYTORCH_CUDA_ALLOC_CONF: x}"]),
]


def _scripts(tmp_path: Path) -> list[Path]:
    paths = []
    for i, recipe in enumerate(sorted((ROOT / "recipes").glob("*.yaml"))):
        plan = build_plan(load_config(recipe), str(tmp_path / f"r{i}"))
        write_run_dir(plan)
        paths += [Path(plan.run_dir) / "launch.sh", Path(plan.run_dir) / "job.sbatch"]
    for j, (recipe, overrides) in enumerate(VARIANTS):
        plan = build_plan(load_config(recipe, overrides), str(tmp_path / f"v{j}"))
        write_run_dir(plan)
        paths += [Path(plan.run_dir) / "launch.sh", Path(plan.run_dir) / "job.sbatch"]
    return paths


def test_every_generated_script_passes_shellcheck_and_bash_n(tmp_path: Path) -> None:
    scripts = _scripts(tmp_path)
    assert len(scripts) >= 22
    done = subprocess.run([SHELLCHECK, "--severity=info", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert os.access(script, os.X_OK)


def test_shellcheck_really_checks(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $DIR/*\n")
    assert subprocess.run([SHELLCHECK, str(bad)], capture_output=True).returncode != 0


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


HOSTILE = 'a\'b "$(touch PWNED_1)" `touch PWNED_2`; touch PWNED_3 && echo $HOME\nline2 \\ end'


def test_hostile_recipe_values_reach_scripts_as_literal_data(tmp_path: Path) -> None:
    """$(...), backticks, quotes, ';' and newlines in recipe values are passed through, never run."""
    work = tmp_path / "work"
    work.mkdir()
    run_dir = work / "out dir 'q' $(touch PWNED_4) `touch PWNED_5`; touch PWNED_6"
    recipe = work / "hostile.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "recipes" / "tiny-cpu.yaml"),
                "run": {"output_dir": str(run_dir)},
                "cluster": {"env": {"HOSTILE": HOSTILE}, "nodes": 2, "gpus_per_node": 1},
            }
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    # The stand-in interpreter records what it was given: argv (one per line, NUL-terminated) and $HOSTILE.
    _stub(bin_dir / "python", f'printf "%s\\0" "$@" > {record}.argv; printf "%s" "$HOSTILE" > {record}.env\n')
    _stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done; exec "$@"\n')
    _stub(bin_dir / "scontrol", "if [[ $1 == show ]]; then echo node1; fi\n")
    _stub(bin_dir / "scancel", "exit 0\n")
    _stub(bin_dir / "getent", 'if [[ $1 == ahostsv4 && $2 == node1 ]]; then echo "10.0.0.5 STREAM node1"; else exit 2; fi\n')

    cfg = load_config(recipe)
    assert cfg.cluster.env["HOSTILE"] == HOSTILE
    plan = build_plan(cfg, cfg.run.output_dir, python=str(bin_dir / "python"))
    write_run_dir(plan)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1"}
    for script, extra in (("job.sbatch", {}), ("launch.sh", {"LAUNCHER_HEAD_ADDR": "node1"})):
        for leftover in (f"{record}.argv", f"{record}.env"):
            Path(leftover).unlink(missing_ok=True)
        done = subprocess.run(["bash", str(run_dir / script)], cwd=work, env={**env, **extra}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        argv = Path(f"{record}.argv").read_text().split("\0")[:-1]
        assert argv[-2:] == ["--plan", str(run_dir / "plan.json")], argv
        assert Path(f"{record}.env").read_text() == HOSTILE
        if script == "job.sbatch":
            # The head node's address, resolved inside the allocation; a port below the ephemeral range.
            assert argv[argv.index("--rdzv_endpoint") + 1] == f"10.0.0.5:{20000 + 4242 % 12000}"
    pwned = sorted(p.name for p in tmp_path.rglob("PWNED*")) + sorted(p.name for p in Path.cwd().glob("PWNED*"))
    assert pwned == [], f"a recipe value was executed: {pwned}"


def test_sbatch_headers_are_literal() -> None:
    cfg = load_config("llama3-70b-qlora-fsdp.yaml", ["cluster.partition=gpu", "cluster.account=acct"])
    script = build_plan(cfg, "/scratch/r").sbatch_script
    headers = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in headers and "#SBATCH --gpus-per-node=8" in headers
    assert "#SBATCH --partition=gpu" in headers and "#SBATCH --account=acct" in headers
    assert "#SBATCH --signal=B:USR1@900" in headers and "#SBATCH --requeue" in headers
    assert not any("$" in line for line in headers)
    assert "scontrol show hostnames" in script and "srun" in script and "--kill-on-bad-exit=1" in script
