"""Rendezvous across two nodes whose own names resolve to loopback addresses on the node itself (the test
cluster's netns mode: n1 sees `127.0.1.1 n1`, as Debian writes it, n2 `127.0.0.1 n2`, as this machine
does). Two agents start as job.sbatch starts them: its rendezvous lines (plan/slurm.py's
rendezvous_block), node_main's is_host from SLURM_NODEID, the planned agent argv, with a stand-in worker
(tests/slurm/rendezvous_worker.py) that joins a gloo world across both nodes and all-reduces. Torch's own
guesses fail there (no agent hosts the store), and would go on failing after it: n2's own address would be
"localhost" (its socket.getfqdn()) and gloo would bind 127.x."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launcher.config import load_config
from launcher.plan import build_plan
from launcher.plan.slurm import rendezvous_block
from launcher.plan.torchrun import LOCAL_ADDR_AUTO, RDZV_CONF, shell_join

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name at run time
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "slurm" / "rendezvous_worker.py")
SHAPE = ["cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.cpus_per_task=2", "cluster.partition=local"]


def _agent_argv(run_dir: Path) -> list[str]:
    """The planned agent argv of a 2-node run, the stand-in worker in place of launcher.runtime."""
    plan = build_plan(load_config(ROOT / "recipes" / "tiny-cpu.yaml", SHAPE), str(run_dir))
    argv = plan.torchrun
    assert argv[1:3] == ["-m", "launcher.agent"] and argv[-4:-1] == ["-m", "launcher.runtime", "--plan"], argv
    assert argv[argv.index("--rdzv_conf") + 1] == RDZV_CONF and argv[argv.index("--local-addr") + 1] == LOCAL_ADDR_AUTO, argv
    return [*argv[:-4], WORKER]


def _torch_alone(argv: list[str]) -> list[str]:
    """The same argv under plain torchrun, as the issue ran it: torch guesses which node hosts the store
    (no is_host) and each node's address (no --local-addr); a store timeout of 3 s (not 60) and no
    restarts, for the failure to come soon."""
    out = [argv[0], "-m", "torch.distributed.run"]
    replaced = {"--local-addr": [], "--rdzv_conf": ["--rdzv_conf", "read_timeout=3"], "--max_restarts": ["--max_restarts", "0"]}
    options = iter(argv[3:])
    for arg in options:
        if arg in replaced:
            next(options)
            out += replaced[arg]
        else:
            out.append(arg)
    return out


def _step(name: str, argv: list[str], out_dir: Path, port_offset: int, kill_on_bad_exit: int = 1) -> str:
    """One srun step on both nodes, in the background (the steps overlap: the control mostly waits on
    its timeout), each node's bash running node_main's is_host line and the agent on its own port. The
    control runs with --kill-on-bad-exit=0: each of its agents fails on its own."""
    return textwrap.dedent(
        f"""
        (
          node_main() {{
            export LAUNCHER_IS_HOST=$((SLURM_NODEID == 0 ? 1 : 0))
            {shell_join(argv)}
          }}
          export LAUNCHER_RDZV_PORT=$((port + {port_offset})) LAUNCHER_RDZV_ID="$SLURM_JOB_ID-{name}"
          srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit={kill_on_bad_exit} --export=ALL --label \\
            --output={out_dir / name}.out bash -c "$(declare -f node_main); node_main"
          echo "{name}: exit $?"
        ) &
        """
    )


def _workers(text: str) -> list[dict]:
    return sorted((json.loads(m) for m in re.findall(r"WORKER (\{.*\})", text)), key=lambda seen: seen["rank"])


def test_agents_meet_and_workers_all_reduce_where_node_names_resolve_to_loopback(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    argv = _agent_argv(tmp_path / "run")
    netns = slurm_cluster.mode == "netns"
    steps = [_step("torch-guess", _torch_alone(argv), tmp_path, 1, kill_on_bad_exit=0), _step("planned", argv, tmp_path, 2)]
    header = (
        f"#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --time=2 --partition=local --output={tmp_path}/job.out\n"
    )
    # job.sbatch's rendezvous lines: n1's address and a free port; each step takes the next ports.
    body = rendezvous_block(load_config(ROOT / "recipes" / "tiny-cpu.yaml", SHAPE).cluster)
    body += '\necho "rendezvous at ${LAUNCHER_HEAD_ADDR}:${LAUNCHER_RDZV_PORT} (${head_node})"\n'
    script = tmp_path / "rendezvous.sbatch"
    script.write_text(header + "set -uo pipefail\n" + body + "".join(steps) + "wait\n")
    t0 = time.monotonic()
    job_id = slurm_cluster.submit(script)
    record = slurm_cluster.wait_done(job_id, timeout=100)
    seconds = time.monotonic() - t0
    job_out = (tmp_path / "job.out").read_text()
    assert record["JobState"] == "COMPLETED", f"{record}\n{job_out}"
    logs = {name: (tmp_path / f"{name}.out").read_text(errors="replace") for name in ("torch-guess", "planned")}
    head = re.search(r"^rendezvous at (\S+):(\d+) \((\S+)\)$", job_out, re.M)
    assert head and head.group(3) == "n1", job_out
    head_addr = head.group(1)
    assert not head_addr.startswith("127."), job_out  # n1 resolves to 127.0.1.1 there: the script took its real address

    # The planned agents meet; both workers, one per node, joined one gloo world and summed 1 + 2.
    planned = _workers(logs["planned"])
    assert "planned: exit 0" in job_out, logs["planned"][-4000:]
    assert [(w["rank"], w["world_size"], w["sum"]) for w in planned] == [(0, 2, 3.0), (1, 2, 3.0)], logs["planned"][-4000:]
    assert sorted(w["node"] for w in planned) == ["n1", "n2"]
    for worker in planned:
        assert worker["own_name_resolves_to"].startswith("127."), worker  # the premise: each node's name is loopback there
        assert worker["master_addr"] == head_addr, worker  # an address, the one the other node reaches
        assert worker["gloo_socket_ifname"], worker  # set by the agent: the interface holding that address
    if netns:
        assert {w["hostname"]: w["own_name_resolves_to"] for w in planned} == {"n1": "127.0.1.1", "n2": "127.0.0.1"}, planned
        assert {w["node"]: w["gloo_socket_ifname"] for w in planned} == {"n1": "lslurm-n1-p", "n2": "lslurm-n2-p"}, planned
        # Torch's own address for n2 is "localhost": without --local-addr, n2 ("localhost" sorts before "n1")
        # would be the rendezvous' rank 0 and publish MASTER_ADDR=localhost, which n1 cannot reach.
        assert {w["node"]: w["fqdn"] for w in planned} == {"n1": "n1", "n2": "localhost"}, planned
        assert "launcher.agent: n1 resolves to 127.0.1.1 here; gloo binds lslurm-n1-p (10.213.77.11)" in logs["planned"]

    # Torch's guesses here: no agent takes n1's address as its own, so none hosts the store (the issue's
    # "client socket has timed out", after 3 s here) and no worker starts.
    guess = logs["torch-guess"]
    assert "torch-guess: exit 0" not in job_out and not _workers(guess) and "[default0]" not in guess, guess[-4000:]
    assert f"The client socket has timed out after 3000ms while trying to connect to ({head_addr}, " in guess, guess[-4000:]
    assert guess.count("RendezvousConnectionError: The connection to the C10d store has failed") >= 2, guess[-4000:]
    print(f"\nrendezvous on 127.x node names, {len(steps)} steps: {seconds:.1f} s from submit to COMPLETED")
