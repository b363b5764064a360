"""The Plan: everything the ranks need, computed once from a RunConfig and written to the run dir.

`build_plan` is a pure function (no file system, no torch); `write_run_dir` writes it out. The
ranks read plan.json and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.config import RunConfig
from launcher.config.errors import ConfigError, Problem
from launcher.config.resolved import digest
from launcher.plan.backend import resolve_backend
from launcher.plan.budget import collective_timeout, save_budget_warning
from launcher.plan.deepspeed import build_deepspeed_config
from launcher.plan.estimate import check_memory, choose_micro_batch, estimate_plan, render_estimate
from launcher.plan.fsdp import build_fsdp_plan
from launcher.plan.network import env_defaults, network_env
from launcher.plan.slurm import build_launch_script, build_sbatch
from launcher.plan.topology import Topology, build_topology
from launcher.plan.torchrun import build_torchrun_argv
from launcher.runfiles import replace_file, umask
from launcher.versions import report as versions_report

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Plan:
    launcher_version: str
    run_dir: str
    config: dict[str, Any]  # the resolved RunConfig as plain data
    topology: dict[str, Any]
    deepspeed: dict[str, Any] | None
    fsdp: dict[str, Any] | None
    torchrun: list[str]
    env: dict[str, str]
    estimate: dict[str, float]
    launch_script: str
    sbatch_script: str
    # parallel.backend as the recipe asked for it, as chosen, and why: {requested, chosen, reason}
    backend_choice: dict[str, str] = field(default_factory=dict)
    # One line each the planner wants the user to read (memory headroom, the signal window's save budget)
    warnings: list[str] = field(default_factory=list)
    # sha256 of `config` as validated by `launcher plan` (launcher/config/resolved.py); "" in older plans
    config_digest: str = ""
    # Python and the watched packages' versions where the plan was made (launcher/versions.py); rank 0
    # compares its own with them and with the tested range. {} in older plans.
    versions: dict[str, str] = field(default_factory=dict)
    # Seconds any collective of any process group may wait: cluster.collective_timeout_seconds, else
    # derived from the save estimate (plan/budget.py). 0 in older plans: torch's defaults.
    collective_timeout_seconds: int = 0
    # Variables the scripts set only where the environment has not (`: "${NAME:=value}"`): GPU jobs'
    # PYTORCH_CUDA_ALLOC_CONF (plan/network.py). {} in older plans.
    env_defaults: dict[str, str] = field(default_factory=dict)

    @property
    def run_config(self) -> RunConfig:
        """The config, validated: built directly when it is the one this launcher version planned
        (its digest unchanged), else validated in full like a recipe (a plan.json edited by hand)."""
        from launcher.config.resolved import config_from_resolved

        if self.launcher_version == __version__ and self.config_digest and self.config_digest == digest(self.config):
            try:
                return config_from_resolved(self.config)
            except (KeyError, TypeError):
                pass
        from launcher.config import config_from_dict

        return config_from_dict(self.config, user_written=False)

    @property
    def plan_path(self) -> str:
        return str(Path(self.run_dir) / PLAN_FILE)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        del data["launch_script"], data["sbatch_script"]  # written as their own files
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data.setdefault("launch_script", "")
        data.setdefault("sbatch_script", "")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """plan.json; a path that is not a regular file (a FIFO would block the read forever) is
        refused with a ConfigError naming it."""
        if Path(path).exists() and not Path(path).is_file():  # missing: the read below says so, as before
            raise ConfigError([Problem(str(path), "is not a regular file (a FIFO, a device or a folder)", "give the run's plan.json")])
        return cls.from_json(Path(path).read_text())


def default_run_dir(cfg: RunConfig) -> str:
    return os.path.abspath(cfg.run.output_dir or os.path.join("runs", cfg.run.name))


def plan_env(cfg: RunConfig, topology: Topology) -> dict[str, str]:
    env = {
        "PYTHONUNBUFFERED": "1",
        # Never put the working directory on sys.path: whatever folder a rank is started from, nothing in
        # it may stand in for an installed package (the checkout itself is safe by construction: its only
        # top-level package is `launcher`; tests/test_shadowing.py holds that).
        "PYTHONSAFEPATH": "1",
        "OMP_NUM_THREADS": str(max(1, cfg.cluster.cpus_per_task // topology.procs_per_node)),
    }
    if cfg.cluster.accelerator == "cuda":
        env.update({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"})
        # NCCL's flight recorder: on a collective timeout every rank dumps its last collectives
        # (job.sbatch points TORCH_NCCL_DEBUG_INFO_TEMP_FILE into RUN/logs), naming the rank that hung.
        env.update({"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"})
    env.update(network_env(cfg.cluster))  # cluster.network: NCCL's transport; nothing on CPU
    env.update(cfg.cluster.env)
    return env


def build_plan(cfg: RunConfig, run_dir: str, python: str = sys.executable) -> Plan:
    """RunConfig → Plan; `run_dir` must be absolute (scripts cd into it on other machines).
    Refuses (ConfigError) a plan whose memory estimate is over the GPU's memory or cluster.mem.
    `parallel.backend: auto` is resolved here: the plan and the ranks see a concrete backend."""
    cfg, choice = resolve_backend(cfg)
    candidates: dict[int, float] = {}
    if cfg.train.auto_micro_batch:
        cfg, candidates = choose_micro_batch(cfg)
    topology = build_topology(cfg.cluster, cfg.train, cfg.data)
    deepspeed = fsdp = None
    if cfg.parallel.backend == "deepspeed":
        deepspeed = build_deepspeed_config(cfg.parallel, cfg.train, cfg.optim, cfg.model, topology)
    elif cfg.parallel.backend == "fsdp":
        fsdp = build_fsdp_plan(cfg.parallel, cfg.train, cfg.model, topology)
    plan_path = str(Path(run_dir) / PLAN_FILE)
    torchrun = build_torchrun_argv(cfg.cluster, topology, plan_path, python)
    env = plan_env(cfg, topology)
    defaults = env_defaults(cfg.cluster)
    memory = estimate_plan(cfg, topology)
    warnings = check_memory(cfg, memory)
    budget = save_budget_warning(cfg.cluster, memory)
    warnings += [budget] if budget else []
    memory.update({f"auto_micro_batch_{m}": total for m, total in candidates.items()})
    config = dataclasses.asdict(cfg)
    return Plan(
        launcher_version=__version__,
        run_dir=run_dir,
        config=config,
        topology=dataclasses.asdict(topology),
        deepspeed=deepspeed,
        fsdp=fsdp,
        torchrun=torchrun,
        env=env,
        estimate=memory,
        launch_script=build_launch_script(topology, cfg.run.name, env, defaults, torchrun),
        sbatch_script=build_sbatch(cfg.cluster, topology, cfg.run.name, run_dir, env, defaults, torchrun),
        backend_choice=dataclasses.asdict(choice),
        warnings=warnings,
        config_digest=digest(config),
        versions=versions_report(),
        collective_timeout_seconds=collective_timeout(cfg.cluster, memory),
        env_defaults=defaults,
    )


def render_files(plan: Plan) -> dict[str, str]:
    """File name → content, exactly what `write_run_dir` writes."""
    import yaml  # here: a rank loads a Plan and writes none of these

    files = {
        "config.yaml": yaml.safe_dump(plan.config, sort_keys=False, width=120),
        PLAN_FILE: plan.to_json(),
        "launch.sh": plan.launch_script,
        "job.sbatch": plan.sbatch_script,
        "estimate.txt": render_estimate(plan.estimate, auto_candidates(plan.estimate)),
    }
    if plan.deepspeed is not None:
        files["deepspeed.json"] = json.dumps(plan.deepspeed, indent=2) + "\n"
    if plan.fsdp is not None:
        files["fsdp.json"] = json.dumps(plan.fsdp, indent=2) + "\n"
    return files


def auto_candidates(estimate: dict[str, float]) -> dict[int, float]:
    """train.auto_micro_batch: each micro-batch the plan compared → its estimated bytes per GPU."""
    prefix = "auto_micro_batch_"
    return {int(k[len(prefix) :]): v for k, v in estimate.items() if k.startswith(prefix)}


# Files that can carry environment values (cluster.env, tokens): owner only, whatever the umask.
PRIVATE = ("config.yaml", PLAN_FILE, "launch.sh", "job.sbatch")


def write_run_dir(plan: Plan) -> list[Path]:
    """Write the plan's files into its run directory, each replaced atomically. Private files are
    0600 (scripts 0700); the others follow the umask. A write that fails (ENOSPC, EROFS, EACCES)
    is one ConfigError line naming the path; a file being replaced keeps its old content."""
    run_dir = Path(plan.run_dir)
    files = render_files(plan)
    mask = umask()
    target = run_dir / "logs"
    written = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            target = run_dir / name
            script = name.endswith((".sh", ".sbatch"))
            mode = (0o700 if script else 0o600) if name in PRIVATE else (0o777 if script else 0o666) & ~mask
            written.append(replace_file(target, text, mode))
    except OSError as exc:
        raise ConfigError([Problem(str(target), f"cannot write ({exc.strerror})", "free some space, or choose a writable --out")]) from None
    return written
