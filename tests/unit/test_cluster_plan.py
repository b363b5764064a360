"""What the plan hands a real cluster: host memory checked against cluster.mem, QLoRA's 4-bit base
counted where FSDP2 CPU offload keeps it, DDP's gradients once, cluster.gpu as the GPU checked and
requested, the rendezvous host named by node id, an allocation of another size refused, and the network presets,
expandable segments and NUMA binding a GPU job gets (and a CPU job does not), each fix of a GPU refusal
with its own estimate, and HSDP noted where it would fit."""

from __future__ import annotations

import math
import re
import stat
import subprocess
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import ConfigError, load_config
from launcher.config.schema import ClusterSection
from launcher.plan import Plan, build_plan, write_run_dir
from launcher.plan.estimate import estimate_plan, host_memory_gib
from launcher.plan.estimate.memory import GIB
from launcher.plan.topology import build_topology

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ZERO3_OFFLOAD = RECIPES / "llama3-70b-full-zero3-offload.yaml"
QLORA_70B = RECIPES / "llama3-70b-qlora-fsdp.yaml"
FULL_8B = RECIPES / "llama3-8b-full-fsdp.yaml"
# Answer.AI's FSDP+QLoRA: Llama 70B on one node of two 24 GB cards (22 GiB usable), FSDP2 CPU offload,
# micro-batch 1 of 2048 tokens with activation checkpointing.
TWO_24GB = [
    "cluster.nodes=1",
    "cluster.gpus_per_node=2",
    "cluster.gpu_memory_gib=22",
    "parallel.fsdp.cpu_offload=true",
    "data.max_seq_len=2048",
]


def _estimate(recipe: Path, *overrides: str) -> dict[str, float]:
    cfg = load_config(recipe, list(overrides))
    return estimate_plan(cfg, build_topology(cfg.cluster, cfg.train, cfg.data))


@pytest.mark.parametrize(
    ("mem", "gib"),
    [("512G", 512.0), ("2T", 2048.0), ("1048576", 1024.0), ("524288M", 512.0), ("1073741824K", 1024.0), ("0", None), ("", None)],
)
def test_cluster_mem_is_read_as_sbatch_reads_it(mem: str, gib: float | None) -> None:
    assert host_memory_gib(ClusterSection(mem=mem)) == gib


def test_zero3_offload_on_one_node_is_refused_at_512g_and_planned_at_2t(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused = tmp_path / "refused"
    assert main(["plan", str(ZERO3_OFFLOAD), "cluster.nodes=1", "cluster.mem=512G", "--out", str(refused)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cluster.mem: the estimate is 1077.3 GiB of host memory per node, 1051.3 GiB of it offloaded states")
    assert "210% of cluster.mem 512G (512 GiB)" in err and not refused.exists()
    # the fixes: nodes enough to spread the states (the shipped 4), memory enough, less offload
    assert "cluster.nodes=4" in err and "cluster.mem=1198G" in err and "parallel.offload_optimizer=none" in err
    planned = tmp_path / "planned"
    assert main(["plan", str(ZERO3_OFFLOAD), "cluster.nodes=1", "cluster.mem=2T", "--out", str(planned)]) == 0
    assert "1077.33 GiB (53% of cluster.mem, 2048 GiB)" in (planned / "estimate.txt").read_text()
    # the shipped 4 nodes fit in 512G; over 90 % is a warning
    assert build_plan(load_config(ZERO3_OFFLOAD, ["cluster.mem=512G"]), str(tmp_path / "four")).warnings == []
    warned = build_plan(load_config(ZERO3_OFFLOAD, ["cluster.mem=300G"]), str(tmp_path / "tight")).warnings
    assert len(warned) == 1 and warned[0].startswith("warning: host memory: the estimate is 288.8 GiB")


def test_gpu_and_host_refusals_come_together() -> None:
    cfg = load_config(ZERO3_OFFLOAD, ["cluster.nodes=1", "cluster.mem=512G", "cluster.gpu_memory_gib=20"])
    with pytest.raises(ConfigError) as refused:
        build_plan(cfg, "/tmp/unused")
    assert [p.key for p in refused.value.problems] == ["cluster.gpu_memory_gib", "cluster.mem"]


def test_fsdp_cpu_offload_keeps_a_qlora_base_on_the_host(tmp_path: Path) -> None:
    plan = build_plan(load_config(QLORA_70B, TWO_24GB), str(tmp_path / "run"))  # accepted: no ConfigError
    e = plan.estimate
    assert e["total"] / GIB == pytest.approx(11.7, rel=0.15)
    # the packed 4-bit shards (31.9 GiB), embeddings, head and norms (3.9), adapters with their
    # gradients and AdamW states (3.1); on the GPUs only each module's quant state (1.0 GiB)
    assert e["host_offloaded"] / GIB == pytest.approx(38.9, abs=0.5)
    assert e["quantized_base"] / GIB == pytest.approx(1.01, abs=0.05)
    write_run_dir(plan)
    assert "offloaded          38.88 GiB" in (tmp_path / "run" / "estimate.txt").read_text()


def test_ddp_counts_its_gradients_once() -> None:
    e = _estimate(RECIPES / "tiny-cpu.yaml", "parallel.backend=ddp")
    assert e["gradients"] == 4 * e["trainable_params"]  # fp32 gradients; the buckets are views of them


def test_cluster_gpu_wins_over_a_larger_recipe_default(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["plan", str(FULL_8B), "cluster.gpu=l4", "--out", str(tmp_path / "l4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cluster.gpu: the estimate is 27.1 GiB per GPU, 120% of the GPU's 22.5 GiB (l4)")
    assert "parallel.fsdp.cpu_offload=true" in err  # the fix that fits it
    assert main(["plan", str(FULL_8B), "cluster.gpu=l4", "parallel.fsdp.cpu_offload=true", "--out", str(tmp_path / "off")]) == 0
    # a smaller gpu_memory_gib (a MIG slice, memory kept back) is the one checked
    assert _estimate(FULL_8B, "cluster.gpu=h100-80gb", "cluster.gpu_memory_gib=40")["gpu_memory_gib"] == 40.0
    # cluster.gpu on the command line replaces the recipe's gpu_memory_gib (80, written for an H100):
    # an h200 is checked against its 140, not capped at the recipe's 80
    assert _estimate(FULL_8B, "cluster.gpu=h200")["gpu_memory_gib"] == 140.0
    assert _estimate(FULL_8B, "cluster.gpu=h200", "cluster.gpu_memory_gib=120")["gpu_memory_gib"] == 120.0


@pytest.mark.parametrize(
    ("overrides", "header"),
    [
        (["cluster.gpu=h100-80gb"], "--gpus-per-node=h100:8"),
        (["cluster.gpu=h100-80gb", "cluster.gpu_type=nvidia_h100_80gb_hbm3"], "--gpus-per-node=nvidia_h100_80gb_hbm3:8"),
        (["cluster.gpu=h100-80gb", "cluster.gpu_type=none"], "--gpus-per-node=8"),
    ],
)
def test_cluster_gpu_is_the_gpu_type_sbatch_asks_for(overrides: list[str], header: str) -> None:
    script = build_plan(load_config(FULL_8B, overrides), "/scratch/r").sbatch_script
    assert [line for line in script.splitlines() if "--gpus-per-node" in line] == [f"#SBATCH {header}"]


def test_a_gpu_type_sbatch_cannot_parse_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.gpu_type: 'h100:8' is not a SLURM name"):
        load_config(FULL_8B, ["cluster.gpu_type=h100:8"])


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_sbatch(
    tmp_path: Path, nodes_in_allocation: int, python: str = "", scontrol: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """job.sbatch of a 2-node plan under stand-ins for srun (every task of a step, with its
    SLURM_NODEID), scontrol, getent and python (which records its argv, then runs `python`);
    `scontrol` runs for any scontrol command but `show`."""
    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["cluster.nodes=2", "cluster.gpus_per_node=1"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    plan = build_plan(cfg, str(tmp_path / "run"), python=str(bin_dir / "python"))
    write_run_dir(plan)
    _stub(bin_dir / "python", f'printf "%s\\0" "$@" >> {record}; printf "\\n" >> {record}\n{python}\n')
    _stub(
        bin_dir / "srun",
        'n=1; [[ $1 == --nodes=2 ]] && n=2; while [[ $1 == --* ]]; do shift; done\nfor ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@" || exit; done\n',
    )
    _stub(bin_dir / "scontrol", f"if [[ $1 == show ]]; then printf 'node1\\nnode2\\n'; else {scontrol or ':'}; fi\n")
    _stub(bin_dir / "scancel", "exit 0\n")
    _stub(bin_dir / "getent", 'if [[ $1 == ahostsv4 && $2 == node1 ]]; then echo "127.0.1.1 STREAM node1"; else exit 2; fi\n')
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": str(nodes_in_allocation),
    }
    done = subprocess.run(["bash", str(tmp_path / "run" / "job.sbatch")], env=env, capture_output=True, text=True)
    calls = [line.split("\0")[:-1] for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


def test_node_0_hosts_the_rendezvous_store_whatever_its_name_resolves_to(tmp_path: Path) -> None:
    done, calls = _run_sbatch(tmp_path, 2)
    assert done.returncode == 0, done.stdout + done.stderr
    agents = [call for call in calls if call[:2] == ["-m", "launcher.agent"]]
    confs = [call[call.index("--rdzv_conf") + 1] for call in agents]
    assert confs == ["is_host=1", "is_host=0"]  # getent said 127.0.1.1 for node1: torch's guess would be wrong
    # torchrun's c10d backend reads is_host from --rdzv_conf, and node 0 then hosts the store itself
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    params = RendezvousParameters("c10d", "127.0.0.1:0", "run", 1, 1, **_parse_rendezvous_config(confs[0]))
    assert params.get_as_bool("is_host") is True
    _, store = create_backend(params)
    store.set("k", "v")
    assert store.get("k") == b"v"


def test_an_allocation_of_another_size_is_refused_in_one_line(tmp_path: Path) -> None:
    done, calls = _run_sbatch(tmp_path, 3)
    assert done.returncode == 2 and calls == []
    assert done.stderr.splitlines() == [
        "launcher: this plan is for 2 node(s), the allocation has 3; re-plan with cluster.nodes=3, or submit without -N"
    ]


def test_collective_timeout_covers_a_save_and_is_at_least_nccls(tmp_path: Path) -> None:
    """988 GB of ZeRO-3 state at 0.5 GB/s on 2 nodes is ~16 min of writing: NCCL's default 10 min
    would end the job mid-save. The plan derives the timeout from the save and writes the number."""
    from launcher.plan.budget import NCCL_TIMEOUT_SECONDS, TIMEOUT_MARGIN, save_seconds

    assert build_plan(load_config(FULL_8B), str(tmp_path / "a")).collective_timeout_seconds == NCCL_TIMEOUT_SECONDS
    slow = ["cluster.mem=2T", "cluster.nodes=2", "cluster.fs_bandwidth_gbps=0.5"]
    plan = build_plan(load_config(ZERO3_OFFLOAD, slow), str(tmp_path / "b"))
    timeout, estimate = plan.collective_timeout_seconds, plan.estimate
    wait = (save_seconds(plan.run_config.cluster, estimate["checkpoint_bytes"]) + estimate["step_seconds"]) * TIMEOUT_MARGIN
    assert estimate["checkpoint_bytes"] > 900e9 and wait <= timeout < wait + 60 and timeout % 60 == 0 and timeout > 30 * 60
    assert f'"collective_timeout_seconds": {timeout}' in plan.to_json()
    assert Plan.from_json(plan.to_json()).collective_timeout_seconds == timeout
    given = build_plan(load_config(FULL_8B, ["cluster.collective_timeout_seconds=7200"]), str(tmp_path / "c"))
    assert given.collective_timeout_seconds == 7200
    with pytest.raises(ConfigError, match=r"cluster\.collective_timeout_seconds: 5 is outside 60-604800"):
        load_config(FULL_8B, ["cluster.collective_timeout_seconds=5"])


GROUPS = """
import json, os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from launcher.runtime.parallel.dist import init_distributed, teardown

info = init_distributed("cpu", timeout_seconds=1234)
mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))  # HSDP's groups
groups = {"world": dist.group.WORLD, "new_group": dist.new_group(backend="gloo"), "mesh": mesh.get_group("shard")}
seconds = {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()}
total = torch.ones(1)
dist.all_reduce(total, group=groups["new_group"])
print("RESULT " + json.dumps({"rank": info.rank, "seconds": seconds, "sum": total.item()}), flush=True)
teardown(True)  # barrier, then destroy: a bare destroy aborts at exit now and then ("terminate called ...", -6)
"""


def test_every_process_group_of_a_two_rank_run_gets_the_timeout(tmp_path: Path) -> None:
    import json
    import os
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", GROUPS], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    results = [json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))) for out in outputs]
    for result in results:
        assert result["seconds"] == {"world": 1234.0, "new_group": 1234.0, "mesh": 1234.0} and result["sum"] == 2.0


PREPARE_STOPPED = 'if [[ " $* " == *" --prepare-only "* ]]; then exit 75; fi'


@pytest.mark.parametrize("requeued", [True, False], ids=["requeued", "requeue-fails"])
def test_a_signal_while_preparing_the_data_requeues_the_job(tmp_path: Path, requeued: bool) -> None:
    """The prepare step exits 75 (stopped on USR1/TERM): the job requeues within MAX_REQUEUES, as
    after a signal save, and no rank starts; a requeue that slurmctld refuses is not recorded as one."""
    calls_file = tmp_path / "scontrol-calls"
    done, calls = _run_sbatch(tmp_path, 2, python=PREPARE_STOPPED, scontrol=f'echo "$*" >> {calls_file}; exit {0 if requeued else 1}')
    logs = tmp_path / "run" / "logs"
    assert [call[-1] for call in calls] == ["--prepare-only"], done.stdout + done.stderr
    assert calls_file.read_text() == "requeue 4242\n" and (logs / "requeues.preempt").read_text() == "1\n"
    assert "launcher: preparing the data stopped on a signal" in done.stdout and "preparing the data failed" not in done.stderr
    state = (logs / "state").read_text().split()[0]
    if requeued:
        assert done.returncode == 0 and state == "requeued", done.stdout + done.stderr
        assert "launcher: requeueing job 4242 (requeue 1 of 3) to prepare the data again" in done.stdout
    else:
        assert done.returncode == 75 and state == "failed", done.stdout + done.stderr
        assert "launcher: scontrol requeue 4242 failed; resubmit to continue" in done.stderr


def test_usr1_while_preparing_the_data_exits_with_the_requeue_code(tmp_path: Path) -> None:
    """The real prepare step (a cold cache: seconds of work) gets USR1 once its handler is in place
    (SigCgt in /proc): one line and exit 75, no traceback, and the next attempt prepares in full."""
    import os
    import signal
    import sys
    import time

    env = {**os.environ, "LAUNCHER_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    write_run_dir(build_plan(load_config(RECIPES / "tiny-cpu.yaml"), str(run)))
    argv = [sys.executable, "-m", "launcher.runtime", "--plan", str(run / "plan.json"), "--prepare-only"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught >> (signal.SIGUSR1 - 1) & 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert err.strip().splitlines()[-1] == "launcher: received SIGUSR1 while preparing the data; stopped (run again to prepare again)"
    assert "Traceback" not in err
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


NETWORK_VARS = ("NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "NCCL_PROTO")


def _exports(script: str) -> dict[str, str]:
    """NAME -> value of each plain `export NAME=value` line of a generated script."""
    lines = [line[len("export ") :] for line in script.splitlines() if line.startswith("export ") and "=" in line.split()[1]]
    return dict(line.split("=", 1) for line in lines if " " not in line)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {}),
        (["cluster.network=ib"], {"NCCL_IB_DISABLE": "0"}),
        (["cluster.network=ib", "cluster.ib_hca=mlx5_0:1,mlx5_1:1"], {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1"}),
        (["cluster.network=ib", "cluster.ib_hca=^mlx5_4"], {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "'^mlx5_4'"}),
        # GPUDirect RDMA only where the instance has it (p5: H100); an L4 (g6) has EFA without it
        (["cluster.network=efa", "cluster.gpu=h100-80gb"], {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}),
        (["cluster.network=efa", "cluster.gpu=l4", "parallel.fsdp.cpu_offload=true"], {"FI_PROVIDER": "efa"}),
        (["cluster.network=socket"], {"NCCL_IB_DISABLE": "1"}),
        (["cluster.network=socket", "cluster.socket_ifname==eth0"], {"NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "'=eth0'"}),
        (["cluster.socket_ifname=ens"], {"NCCL_SOCKET_IFNAME": "ens"}),
        # cluster.env has the last word
        (["cluster.network=socket", "cluster.env={NCCL_IB_DISABLE: '0'}"], {"NCCL_IB_DISABLE": "0"}),
    ],
)
def test_cluster_network_is_exported_in_both_scripts_of_a_gpu_job(overrides: list[str], expected: dict[str, str]) -> None:
    plan = build_plan(load_config(FULL_8B, overrides), "/scratch/r")
    for script in (plan.launch_script, plan.sbatch_script):
        exported = _exports(script)
        assert {name: exported[name] for name in NETWORK_VARS if name in exported} == expected
    assert {name: plan.env[name] for name in NETWORK_VARS if name in plan.env} == {k: v.strip("'") for k, v in expected.items()}


def test_a_gpu_job_defaults_expandable_segments_unless_the_environment_sets_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "python", 'printf "%s" "$PYTORCH_CUDA_ALLOC_CONF"\n')
    plan = build_plan(load_config(FULL_8B), str(tmp_path / "run"), python=str(bin_dir / "python"))
    assert plan.env_defaults == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} and "PYTORCH_CUDA_ALLOC_CONF" not in plan.env
    assert ': "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"' in plan.sbatch_script.splitlines()
    write_run_dir(plan)
    launch = str(tmp_path / "run" / "launch.sh")
    unset = subprocess.run(["bash", launch], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert unset.stdout == "expandable_segments:True", unset.stderr
    mine = subprocess.run(
        ["bash", launch],
        env={"PATH": "/usr/bin:/bin", "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"},
        capture_output=True,
        text=True,
    )
    assert mine.stdout == "backend:cudaMallocAsync", mine.stderr
    # set in the recipe: exported as cluster.env is, and no default line
    given = build_plan(load_config(FULL_8B, ["cluster.env={PYTORCH_CUDA_ALLOC_CONF: 'garbage_collection_threshold:0.8'}"]), "/scratch/r")
    assert given.env_defaults == {} and "PYTORCH_CUDA_ALLOC_CONF:=" not in given.sbatch_script
    assert _exports(given.launch_script)["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"


def test_a_cpu_job_gets_no_network_alloc_or_numa_settings() -> None:
    overrides = ["cluster.network=ib", "cluster.ib_hca=mlx5_0", "cluster.socket_ifname=eth0", "cluster.numa_binding=node"]
    plan = build_plan(load_config(RECIPES / "tiny-cpu.yaml", overrides), "/scratch/r")
    for script in (plan.launch_script, plan.sbatch_script):
        assert not any(name in script for name in (*NETWORK_VARS, "PYTORCH_CUDA_ALLOC_CONF", "numa"))
    assert plan.env_defaults == {"GOMP_SPINCOUNT": "1000"} and "--numa-binding" not in plan.torchrun


def test_a_cpu_job_bounds_openmp_spinning_unless_the_environment_sets_it(tmp_path: Path) -> None:
    """GOMP_SPINCOUNT=1000 where neither the environment nor cluster.env says otherwise: in launch.sh,
    job.sbatch and the ranks `launcher run` starts (ranks.rank_env: the environment wins)."""
    from launcher.ranks import rank_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "python", 'printf "%s" "$GOMP_SPINCOUNT"\n')
    plan = build_plan(load_config(RECIPES / "tiny-cpu.yaml"), str(tmp_path / "run"), python=str(bin_dir / "python"))
    assert ': "${GOMP_SPINCOUNT:=1000}"' in plan.sbatch_script.splitlines() and "GOMP_SPINCOUNT" not in plan.env
    write_run_dir(plan)
    launch = str(tmp_path / "run" / "launch.sh")
    for given, expected in (({}, "1000"), ({"GOMP_SPINCOUNT": "300000"}, "300000")):
        done = subprocess.run(["bash", launch], env={"PATH": "/usr/bin:/bin", **given}, capture_output=True, text=True)
        assert done.stdout == expected, done.stderr
        assert rank_env(given, plan, 0, 29500, 0)["GOMP_SPINCOUNT"] == expected
    given_plan = build_plan(load_config(RECIPES / "tiny-cpu.yaml", ["cluster.env={GOMP_SPINCOUNT: '0'}"]), "/scratch/r")
    assert given_plan.env_defaults == {} and _exports(given_plan.launch_script)["GOMP_SPINCOUNT"] == "0"


@pytest.mark.parametrize("mode", ["node", "socket", "exclusive", "core-complex"])
def test_numa_binding_reaches_torchrun_as_torch_reads_it(mode: str) -> None:
    from torch.distributed.run import get_args_parser

    from launcher.versions import torchrun_flags_missing

    argv = build_plan(load_config(FULL_8B, [f"cluster.numa_binding={mode}"]), "/scratch/r").torchrun
    assert argv[argv.index("--numa-binding") + 1] == mode
    assert torchrun_flags_missing(argv[3:]) == []  # launcher.agent's check passes on this torch
    assert get_args_parser().parse_args(argv[3:]).numa_binding == mode
    assert "--numa-binding" not in build_plan(load_config(FULL_8B), "/scratch/r").torchrun  # none: torch's default


@pytest.mark.parametrize(
    ("override", "error"),
    [
        (
            "cluster.network=infiniband",
            r"^error: cluster\.network: Invalid value 'infiniband', expected one of \['auto', 'ib', 'efa', 'socket'\]",
        ),
        ("cluster.numa_binding=numa", r"^error: cluster\.numa_binding: Invalid value 'numa', expected one of \['none', 'node'"),
        (
            "cluster.ib_hca=mlx5_0",
            r"^error: cluster\.ib_hca: is read only with cluster\.network: ib \(it is auto\); set cluster\.network: ib",
        ),
        ("cluster.socket_ifname=eth0;reboot", r"^error: cluster\.socket_ifname: 'eth0;reboot' is not a list NCCL reads; use e\.g\. eth0"),
    ],
)
def test_a_bad_network_setting_is_one_line(override: str, error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(FULL_8B, [override])
    assert len(refused.value.problems) == 1
    assert re.match(error, str(refused.value)), str(refused.value)


def _fix_list(err: str) -> dict[str, float]:
    """A GPU refusal's fixes: override(s) -> GiB per GPU, in the order given."""
    fixes = re.split(r"(?:^|; )try ", err, maxsplit=1)[1].split(" (see `launcher estimate`")[0]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(?:^|; )([^:;]+): ([\d.]+) GiB per GPU", fixes)}


def test_a_gpu_refusal_gives_each_fix_with_its_estimate_those_that_fit_first(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["plan", str(FULL_8B), "cluster.gpu=l4", "cluster.mem=128G", "--out", str(tmp_path / "l4")]) == 2
    err = capsys.readouterr().err
    fixes = _fix_list(err)
    assert list(fixes) == ["cluster.nodes=2", "parallel.fsdp.cpu_offload=true", "train.micro_batch_size=1"]  # 22.5 GiB: the first two fit
    assert fixes["parallel.fsdp.cpu_offload=true"] == pytest.approx(10.9, abs=0.05)
    assert "parallel.fsdp.cpu_offload=true: 10.9 GiB per GPU and 146 GiB of host memory per node (over cluster.mem 128G)" in err
    # each figure is what the plan estimates with that override
    for override, gib in fixes.items():
        assert _estimate(FULL_8B, "cluster.gpu=l4", *override.split())["total"] / GIB == pytest.approx(gib, abs=0.05), override


def test_ddp_over_the_gpu_is_offered_fsdp_with_and_without_offload_and_no_fix_that_gains_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", str(FULL_8B), "parallel.backend=ddp", "--out", "/tmp/unused-ddp"]) == 2
    fixes = _fix_list(capsys.readouterr().err)
    assert list(fixes)[:2] == ["parallel.backend=fsdp", "parallel.backend=fsdp parallel.fsdp.cpu_offload=true"]
    assert "cluster.nodes=2" not in fixes  # DDP holds everything on every GPU, however many nodes
    for override, gib in fixes.items():
        assert _estimate(FULL_8B, "parallel.backend=ddp", *override.split())["total"] / GIB == pytest.approx(gib, abs=0.05), override


SIXTEEN_NODES = ["cluster.nodes=16", "train.global_batch_size=256"]


def test_hsdp_is_noted_at_16_nodes_where_sharding_within_a_node_fits(tmp_path: Path) -> None:
    notes = build_plan(load_config(FULL_8B, SIXTEEN_NODES), str(tmp_path / "a")).warnings
    assert notes == [next(n for n in notes if n.startswith("note: parallel.fsdp.hsdp=true fits (27.1 GiB per GPU, 34% of 80 GiB)"))]
    assert "within each node's 8 GPUs and replicate across the 16 nodes" in notes[0]
    assert build_plan(load_config(FULL_8B, ["cluster.nodes=8", "train.global_batch_size=128"]), str(tmp_path / "b")).warnings == []
    # an L4 holds the 8B sharded over 128 ranks (11.9 GiB) but not over one node's 8 (27.1): no note
    assert build_plan(load_config(FULL_8B, [*SIXTEEN_NODES, "cluster.gpu=l4"]), str(tmp_path / "c")).warnings == []
    # already HSDP and over the L4: sharding over every rank is the fix
    with pytest.raises(ConfigError) as refused:
        build_plan(load_config(FULL_8B, [*SIXTEEN_NODES, "cluster.gpu=l4", "parallel.fsdp.hsdp=true"]), str(tmp_path / "d"))
    assert next(iter(_fix_list(refused.value.problems[0].fix))) == "parallel.fsdp.hsdp=false"


def test_the_70b_offload_recipe_says_what_its_estimate_says(tmp_path: Path) -> None:
    e = _estimate(ZERO3_OFFLOAD)
    comment = " ".join(line.lstrip("# ") for line in ZERO3_OFFLOAD.read_text().splitlines() if line.startswith("#"))
    assert f"{e['total'] / GIB:.1f} GiB per GPU and {e['host_total'] / GIB:.1f} GiB of host memory per node" in comment
    assert f"({e['host_offloaded'] / GIB:.1f} GiB of it offloaded states" in comment
    assert f"({e['host_offloaded'] * 4 / GIB:,.0f} GiB, about {round(e['host_offloaded'] * 4 / 1e10) * 10:,.0f} GB)" in comment
    refused, warned = math.ceil(e["host_total"] / GIB), math.ceil(e["host_total"] / GIB / 0.9)
    assert f"refuses a cluster.mem under {refused}G and warns under {warned}G" in comment
    assert f"on 1 node the host side is {_estimate(ZERO3_OFFLOAD, 'cluster.nodes=1')['host_total'] / GIB:,.0f} GiB" in comment
    assert build_plan(load_config(ZERO3_OFFLOAD, [f"cluster.mem={refused}G"]), str(tmp_path / "a")).warnings != []
    with pytest.raises(ConfigError, match=r"^error: cluster\.mem: the estimate is 288\.8 GiB"):
        build_plan(load_config(ZERO3_OFFLOAD, [f"cluster.mem={refused - 1}G"]), str(tmp_path / "b"))
    assert build_plan(load_config(ZERO3_OFFLOAD, [f"cluster.mem={warned}G"]), str(tmp_path / "c")).warnings == []


def test_estimate_txt_names_the_file_system_speed_it_used(tmp_path: Path) -> None:
    from launcher.plan import render_files

    given = render_files(build_plan(load_config(ZERO3_OFFLOAD, ["cluster.fs_bandwidth_gbps=0.5"]), str(tmp_path / "a")))["estimate.txt"]
    assert "checkpoint per save: 987.8 GB, ~494 s at 0.5 GB/s per node (cluster.fs_bandwidth_gbps)" in given
    assumed = render_files(build_plan(load_config(ZERO3_OFFLOAD), str(tmp_path / "b")))["estimate.txt"]
    assert "checkpoint per save: 987.8 GB, ~123 s at 2 GB/s per node (assumed)" in assumed
