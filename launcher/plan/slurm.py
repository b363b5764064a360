"""Plan → the sbatch script, from the template in slurm/src/ (installed as launcher.slurm)."""

from __future__ import annotations

import re
import shlex
from importlib import resources

from launcher import __version__
from launcher.config.schema import GRES_TYPES, ClusterSection
from launcher.plan.topology import Topology
from launcher.plan.torchrun import shell_join

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved; run me again"
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 12000  # job.sbatch probes upwards from here, wrapping in the span
_FIELD = re.compile(r"\{\{(\w+)\}\}")


def render_template(name: str, fields: dict[str, str]) -> str:
    """Fill `{{field}}` markers; every marker must have a value and every value a marker."""
    text = (resources.files("launcher.slurm") / name).read_text()
    used = set(_FIELD.findall(text))
    assert used == set(fields), f"template {name} fields {sorted(used)} != given {sorted(fields)}"
    return _FIELD.sub(lambda m: fields[m.group(1)], text)


def gres_type(cluster: ClusterSection) -> str:
    """`TYPE:` for --gpus-per-node, so a plan checked against cluster.gpu's memory gets that GPU:
    cluster.gpu_type, else the usual name for cluster.gpu; "" without either (or gpu_type none)."""
    name = cluster.gpu_type or GRES_TYPES.get(cluster.gpu, "")
    return f"{name}:" if name and name != "none" else ""


def sbatch_headers(cluster: ClusterSection, topology: Topology, run_name: str, run_dir: str) -> list[str]:
    """Literal #SBATCH lines; values were restricted by validate.py to what sbatch can parse."""
    opts = [
        f"--job-name={run_name}",
        f"--nodes={topology.nodes}",
        "--ntasks-per-node=1",
    ]
    if cluster.accelerator == "cuda":
        opts.append(f"--gpus-per-node={gres_type(cluster)}{topology.procs_per_node}")
    opts.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if cluster.mem:
        opts.append(f"--mem={cluster.mem}")
    opts.append(f"--time={cluster.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            opts.append(f"--{key}={getattr(cluster, key)}")
    opts += [f'--output="{run_dir}/logs/%x-%j.out"', f'--error="{run_dir}/logs/%x-%j.err"']
    if cluster.signal_seconds:
        opts.append(f"--signal=B:USR1@{cluster.signal_seconds}")
    opts.append("--requeue" if cluster.requeue else "--no-requeue")
    opts.append("--open-mode=append")
    opts += cluster.extra_sbatch
    return [f"#SBATCH {opt}" for opt in opts]


def _quote(value: str) -> str:
    """shlex.quote, and quotes round a value it left bare that starts with '=' (NCCL's exact-name
    prefix, =eth0): bash reads NAME==eth0 right, shellcheck (SC1097) and people do not."""
    quoted = shlex.quote(value)
    return f"'{value}'" if quoted.startswith("=") else quoted


def env_block(env: dict[str, str], defaults: dict[str, str] | None = None) -> str:
    """`export NAME=value` for the plan's variables; a default only where the environment has none."""
    lines = [f"export {name}={_quote(value)}" for name, value in env.items()]
    for name, value in (defaults or {}).items():  # values from plan/network.py: plain words, checked there
        lines += [f': "${{{name}:={value}}}"', f"export {name}"]
    return "\n".join(lines)


def rendezvous_block(cluster: ClusterSection) -> str:
    """The batch shell's rendezvous lines (job.sbatch and doctor.sbatch): the head node's address and a
    free port, exported as LAUNCHER_HEAD_ADDR and LAUNCHER_RDZV_PORT for the agents."""
    # Below the ephemeral range (32768-60999): an outgoing connection can never be holding it.
    port = str(cluster.rdzv_port) if cluster.rdzv_port else f"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"
    return render_template("rendezvous.sh.tmpl", {"rdzv_port": port}).rstrip("\n")


def build_sbatch(
    cluster: ClusterSection,
    topology: Topology,
    run_name: str,
    run_dir: str,
    env: dict[str, str],
    defaults: dict[str, str],
    torchrun: list[str],
) -> str:
    return render_template(
        "job.sbatch.tmpl",
        {
            "sbatch_headers": "\n".join(sbatch_headers(cluster, topology, run_name, run_dir)),
            "version": __version__,
            "run_name": run_name,
            "run_dir": shlex.quote(run_dir),
            "python": shlex.quote(torchrun[0]),
            "max_requeues": str(cluster.max_requeues),
            "max_failure_requeues": str(cluster.max_failure_requeues),
            "requeue": "1" if cluster.requeue else "0",
            "requeue_exit_code": str(REQUEUE_EXIT_CODE),
            "env_block": env_block(env, defaults),
            "signal_seconds": str(cluster.signal_seconds),
            "rendezvous": rendezvous_block(cluster),
            "nodes": str(topology.nodes),
            "cpus_per_task": str(cluster.cpus_per_task),
            "torchrun": shell_join(torchrun),
        },
    )


def build_launch_script(topology: Topology, run_name: str, env: dict[str, str], defaults: dict[str, str], torchrun: list[str]) -> str:
    """launch.sh: the exact torchrun command for this machine (or, multi-node, for each node)."""
    lines = [
        "#!/bin/bash",
        f"# Generated by launcher {__version__} for run {run_name}: torchrun with {topology.procs_per_node} "
        f"process(es) per node on {topology.nodes} node(s).",
        "set -euo pipefail",
    ]
    if env or defaults:
        lines.append(env_block(env, defaults))
    if topology.nodes > 1:
        lines += [
            "# Multi-node: run this on every node with the same values (job.sbatch does it for you).",
            ': "${LAUNCHER_HEAD_ADDR:?set LAUNCHER_HEAD_ADDR to the address of the first node}"',
            ': "${LAUNCHER_RDZV_PORT:=29500}"',
            f': "${{LAUNCHER_RDZV_ID:={run_name}}}"',
            "# The node at LAUNCHER_HEAD_ADDR hosts the rendezvous store (LAUNCHER_IS_HOST=1, else 0): in an srun",
            "# step node 0, else the node that has that address or name. Set LAUNCHER_IS_HOST to say it yourself.",
            "if [[ -z ${LAUNCHER_IS_HOST:-} && -n ${SLURM_STEP_ID:-} ]]; then",
            "  LAUNCHER_IS_HOST=$((SLURM_NODEID == 0 ? 1 : 0))",
            "elif [[ -z ${LAUNCHER_IS_HOST:-} ]]; then",
            '  names=" localhost $(hostname) $(hostname -f 2>/dev/null || true) $(hostname -I 2>/dev/null || true) "',
            '  if [[ $names == *" $LAUNCHER_HEAD_ADDR "* || $LAUNCHER_HEAD_ADDR == 127.* ]]; then LAUNCHER_IS_HOST=1; else LAUNCHER_IS_HOST=0; fi',
            "fi",
            "export LAUNCHER_HEAD_ADDR LAUNCHER_RDZV_PORT LAUNCHER_RDZV_ID LAUNCHER_IS_HOST",
        ]
    lines.append("exec " + shell_join(torchrun))
    return "\n".join(lines) + "\n"
