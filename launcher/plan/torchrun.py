"""Plan → the torchrun argv, and shell rendering that keeps every recipe value literal."""

from __future__ import annotations

import shlex
from pathlib import Path

from launcher.config.schema import ClusterSection
from launcher.plan.topology import Topology

# Values known only inside the allocation; launch.sh / job.sbatch export them.
HEAD_ADDR = "${LAUNCHER_HEAD_ADDR}"
RDZV_PORT = "${LAUNCHER_RDZV_PORT}"
RDZV_ID = "${LAUNCHER_RDZV_ID}"
RDZV_ENDPOINT = f"{HEAD_ADDR}:{RDZV_PORT}"
# 1 on the first node (the one at HEAD_ADDR), 0 elsewhere: that node hosts the rendezvous store
# whatever its own name resolves to (torch guesses from the name, and Debian maps it to 127.0.1.1)
RDZV_CONF = "is_host=${LAUNCHER_IS_HOST}"
_PLACEHOLDERS = frozenset({RDZV_ENDPOINT, RDZV_ID, RDZV_CONF})
LOCAL_ADDR_AUTO = "auto"  # launcher/agent.py resolves it on each node
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGUSR1,SIGHUP,SIGQUIT"
MIN_SHUTDOWN_SECONDS = 120


def shutdown_timeout(signal_seconds: int) -> int:
    """Seconds torchrun (or `launcher run`) waits for the ranks after a signal: the save window
    SLURM gives (cluster.signal_seconds), at least 2 min."""
    return max(signal_seconds, MIN_SHUTDOWN_SECONDS)


def build_torchrun_argv(cluster: ClusterSection, topology: Topology, plan_path: str, python: str) -> list[str]:
    argv = [python, "-m", "launcher.agent"]  # torchrun (torch.distributed.run), without the slow exit
    if topology.nodes == 1:
        # --standalone: a private c10d store on a free local port, so two runs on a box don't clash.
        argv += ["--standalone", "--nnodes", "1"]
    else:
        argv += [
            "--nnodes",
            str(topology.nodes),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            RDZV_ENDPOINT,
            "--rdzv_id",
            RDZV_ID,
            "--rdzv_conf",
            RDZV_CONF,
            # launcher.agent makes it the address this node reaches the endpoint from: the one MASTER_ADDR
            # needs (torch takes socket.getfqdn(), "localhost" on some images); it binds gloo there too
            "--local-addr",
            LOCAL_ADDR_AUTO,
        ]
    if cluster.accelerator == "cuda" and cluster.numa_binding != "none":
        # each rank on the CPUs (and memory) of its GPU's NUMA node, socket or share: under numactl
        argv += ["--numa-binding", cluster.numa_binding]
    argv += [
        "--nproc_per_node",
        str(topology.procs_per_node),
        "--max_restarts",
        str(cluster.max_restarts),
        # torchrun passes these on to the ranks, which save at the next step boundary and exit 75;
        # it SIGKILLs them only after the shutdown timeout, which must cover a save.
        "--signals-to-handle",
        FORWARDED_SIGNALS,
        "--shutdown-timeout",
        str(shutdown_timeout(cluster.signal_seconds)),
        # Every rank's output also in RUN/logs/torchrun/<attempt>/<local rank>/, and prefixed on the console.
        "--log-dir",
        str(Path(plan_path).parent / "logs" / "torchrun"),
        "--tee",
        "3",
        "-m",
        "launcher.runtime",
        "--plan",
        plan_path,
    ]
    return argv


def shell_join(argv: list[str]) -> str:
    """Quote each argument for bash; only our own ${LAUNCHER_*} placeholders expand."""
    return " ".join(f'"{arg}"' if arg in _PLACEHOLDERS else shlex.quote(arg) for arg in argv)
