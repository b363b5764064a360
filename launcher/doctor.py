"""`launcher doctor [RECIPE]`: can this machine run the recipe? One line per check, with the fix.

Each check returns a `Check` (status ok / warn / fail, a name, what was found, how to fix it). With a
recipe, what is required follows from it (CUDA for cluster.accelerator=cuda, bitsandbytes for QLoRA,
DeepSpeed for its backend); without one, missing optional pieces are warnings. Exit code 1 when a
check failed, else 0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher import __version__
from launcher.config import RunConfig

Status = Literal["ok", "warn", "fail"]
HUB_TIMEOUT = 3.0  # seconds for the Hub's name to resolve and its port to answer


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    found: str
    fix: str = ""

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{self.status:<4}  {self.name}: {self.found}{fix}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _needed(required: bool) -> Status:
    return "fail" if required else "warn"


def check_torch() -> Iterator[Check]:
    import torch

    cuda = torch.version.cuda
    build = f"CUDA {cuda} build" if cuda else "CPU build"
    yield Check("ok", "torch", f"{torch.__version__} ({build}), Python {sys.version.split()[0]}")


def check_cuda(cfg: RunConfig | None) -> Iterator[Check]:
    import torch

    want_cuda = cfg is not None and cfg.cluster.accelerator == "cuda"
    procs = cfg.cluster.gpus_per_node if cfg is not None else None
    if not torch.cuda.is_available():
        why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        fix = "run on a GPU node with a CUDA build of torch, or set cluster.accelerator=cpu"
        status: Status = "fail" if want_cuda else "ok"
        yield Check(status, "cuda", why + ("" if want_cuda else " (not needed)"), fix)
        if cfg is None or want_cuda:  # a CPU recipe's ranks talk over gloo: NCCL is not its concern
            yield Check(status, "nccl", "not available" + ("" if want_cuda else " (gloo on CPU)"), fix)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if procs is not None and not want_cuda:
            status = "ok" if cores >= procs else "warn"
            fix = f"use cluster.gpus_per_node<={cores}, or expect the processes to share cores"
            yield Check(status, "processes", f"{procs} CPU process(es) per node on {cores} core(s)", fix)
        elif procs is not None:
            yield Check(
                "fail", "gpus", f"0 GPUs visible, the recipe runs {procs} process(es) per node", "run on a node with that many GPUs"
            )
        return
    count = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    yield Check("ok", "cuda", f"CUDA {torch.version.cuda}, {count} x {name} (compute capability {capability})")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "unknown"
    yield Check("ok", "nccl", f"NCCL {nccl}")
    if procs is not None:
        status = "ok" if count >= procs else "fail"
        yield Check(
            status, "gpus", f"{count} GPU(s) visible for {procs} process(es) per node", "set cluster.gpus_per_node, or CUDA_VISIBLE_DEVICES"
        )


def check_kernels(cfg: RunConfig | None) -> Iterator[Check]:
    flash = _version("flash-attn")
    want_flash = cfg is not None and cfg.kernels.attention == "flash"
    if flash is not None and importlib.util.find_spec("flash_attn") is not None:
        yield Check("ok", "flash-attn", f"{flash} importable")
    else:
        found = "not installed; attention falls back to SDPA" if not want_flash else "not installed, and kernels.attention is flash"
        yield Check(_needed(want_flash), "flash-attn", found, "pip install launcher[flash] on a CUDA machine (or kernels.attention=sdpa)")
    liger = _version("liger-kernel")
    want_liger = cfg is not None and (cfg.kernels.liger or cfg.kernels.loss == "liger")
    if liger is not None and importlib.util.find_spec("liger_kernel") is not None:
        yield Check("ok", "liger-kernel", f"{liger} importable")
    else:
        found = "not installed; the chunked PyTorch loss is used" if not want_liger else "not installed, and the recipe asks for it"
        yield Check(_needed(want_liger), "liger-kernel", found, "pip install liger-kernel (CUDA), or kernels.liger=false kernels.loss=auto")


def check_bitsandbytes(cfg: RunConfig | None) -> Iterator[Check]:
    want = cfg is not None and cfg.method.name == "qlora"
    fix = "pip install launcher[qlora] (bitsandbytes>=0.45)"
    if _version("bitsandbytes") is None:
        yield Check(_needed(want), "bitsandbytes", "not installed" + ("" if want else " (needed for QLoRA only)"), fix)
        return
    try:  # a real 4-bit round trip: importable is not the same as working on this machine
        import torch
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weight = torch.randn(64, 64, device=device)
        packed, state = quantize_4bit(weight, quant_type="nf4")
        error = (dequantize_4bit(packed, state) - weight).abs().max().item()
    except Exception as exc:  # any failure here is the finding
        yield Check(
            _needed(want), "bitsandbytes", f"{_version('bitsandbytes')} installed but 4-bit fails: {type(exc).__name__}: {exc}", fix
        )
        return
    yield Check("ok", "bitsandbytes", f"{_version('bitsandbytes')}, NF4 round trip on {device} (max error {error:.2f})")


def check_extras(cfg: RunConfig | None) -> Iterator[Check]:
    wants = {
        "deepspeed": cfg is not None and cfg.parallel.backend == "deepspeed",
        "peft": cfg is not None and cfg.method.peft,
    }
    extra = {"deepspeed": "deepspeed", "peft": "lora"}
    for dist, want in wants.items():
        version = _version(dist)
        if version is not None:
            yield Check("ok", dist, version)
        else:
            yield Check(
                _needed(want), dist, "not installed" + (", and the recipe needs it" if want else ""), f"pip install launcher[{extra[dist]}]"
            )


def check_versions() -> Iterator[Check]:
    """The watched packages against the versions the suite passed on (launcher/versions.py)."""
    from launcher.versions import LOCK_NAME, installed, locked, series, untested

    tested, found = locked(), installed()
    outside = untested(found, tested)
    for name, want in outside.items():
        yield Check("warn", "versions", f"{name} {found[name]} is outside the tested range {series(want)}", f"pip install '{name}=={want}'")
    if not outside:
        checked = [name for name in found if name in tested]
        yield Check("ok", "versions", f"{len(checked)} watched packages within the tested range ({LOCK_NAME})")


def check_output(cfg: RunConfig | None) -> Iterator[Check]:
    from launcher.plan import default_run_dir

    target = Path(default_run_dir(cfg)) if cfg is not None else Path.cwd() / "runs"
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".launcher-doctor-"):
            pass
    except OSError as exc:
        yield Check("fail", "output", f"{target}: not writable ({exc.strerror})", "choose another directory with --out or run.output_dir")
        return
    where = "" if probe == target else f" (to be created; {probe} is writable)"
    shared = " inside SLURM job " + os.environ["SLURM_JOB_ID"] if "SLURM_JOB_ID" in os.environ else ""
    yield Check("ok", "output", f"{target} writable{where}{shared}")


def _listening_ports() -> set[int] | None:
    """TCP ports something listens on here (/proc/net/tcp and tcp6, state 0A), as job.sbatch reads
    them; None where /proc has no such files."""
    ports: set[int] = set()
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        ports |= {int(f[1].rsplit(":", 1)[1], 16) for f in (line.split() for line in lines) if len(f) > 3 and f[3] == "0A"}
    return ports if found else None


def _port_taken(port: int, listening: set[int] | None) -> str:
    """Why `port` cannot be the rendezvous port here ("" when it can)."""
    if listening is not None:
        return "something listens on it" if port in listening else ""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            return exc.strerror or "cannot bind"
    return ""


def check_port(cfg: RunConfig | None) -> Iterator[Check]:
    """The port a job would really use: cluster.rdzv_port, else job.sbatch's 20000 + SLURM_JOB_ID %
    12000 (inside a job), probed upwards past ports in use, as the script does."""
    from launcher.plan.slurm import RDZV_PORT_BASE, RDZV_PORT_SPAN

    listening = _listening_ports()
    fixed = cfg.cluster.rdzv_port if cfg is not None else None
    if fixed:
        taken = _port_taken(fixed, listening)
        if taken:
            yield Check(
                "fail",
                "rendezvous port",
                f"{fixed} (cluster.rdzv_port) is taken on this machine ({taken})",
                "set cluster.rdzv_port to a free port, or leave it out",
            )
            return
        ephemeral = " (inside the ephemeral range 32768-60999)" if 32768 <= fixed <= 60999 else ""
        yield Check(
            "warn" if ephemeral else "ok", "rendezvous port", f"{fixed} (cluster.rdzv_port) free{ephemeral}", "pick a port below 32768"
        )
        return
    rule = f"{RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}"
    if "SLURM_JOB_ID" not in os.environ or not os.environ["SLURM_JOB_ID"].isdigit():
        busy = sum(1 for port in listening or () if RDZV_PORT_BASE <= port < RDZV_PORT_BASE + RDZV_PORT_SPAN)
        status: Status = "ok" if busy < RDZV_PORT_SPAN // 2 else "warn"
        found = f"jobs use {rule}, the next free one above; {busy} of {RDZV_PORT_SPAN} in use here"
        yield Check(status, "rendezvous port", found, "set cluster.rdzv_port to a port nothing else uses")
        return
    port = start = RDZV_PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % RDZV_PORT_SPAN
    for _ in range(64):  # job.sbatch's probe
        if not _port_taken(port, listening):
            moved = "" if port == start else f" ({start} is in use)"
            yield Check("ok", "rendezvous port", f"{port} free for job {os.environ['SLURM_JOB_ID']} ({rule}){moved}")
            return
        port = RDZV_PORT_BASE + (port - RDZV_PORT_BASE + 1) % RDZV_PORT_SPAN
    yield Check("fail", "rendezvous port", f"{start} and the 63 ports above it are in use", "set cluster.rdzv_port to a free port")


def _hub_reachable(url: str) -> tuple[bool, str]:
    """(reachable, what was found): the endpoint's name resolved and its port connected, each
    within HUB_TIMEOUT (a resolver thread: getaddrinfo has no timeout of its own)."""
    import threading
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    result: list[object] = []

    def resolve() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT)
    if not result:
        return False, f"{host} did not resolve within {HUB_TIMEOUT:g} s"
    if isinstance(result[0], OSError):
        return False, f"{host} does not resolve ({result[0]})"
    family, kind, proto, _, address = result[0][0]  # type: ignore[index]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(max(0.1, HUB_TIMEOUT - (time.monotonic() - started)))
        try:
            sock.connect(address)
        except OSError as exc:
            return False, f"{host}:{port} does not answer ({exc.strerror or exc})"
    return True, f"{host}:{port} answered in {time.monotonic() - started:.2f} s"


def check_offline() -> Iterator[Check]:
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes", "ON", "on")
    cache = Path(constants.HF_HUB_CACHE)
    launcher_cache = os.environ.get("LAUNCHER_CACHE_DIR") or str(Path.home() / ".cache" / "launcher")
    caches = f"Hub cache {cache}; launcher cache {launcher_cache}"
    if offline:
        yield Check("ok", "hub", f"offline (HF_HUB_OFFLINE=1): models and data come from the caches only; {caches}")
    else:
        reachable, found = _hub_reachable(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
        if reachable:
            yield Check("ok", "hub", f"reachable ({found}); {caches}")
        else:
            fix = "prepare where the Hub is reachable (launcher prepare RECIPE) and set HF_HUB_OFFLINE=1 here"
            yield Check("warn", "hub", f"unreachable: {found}; {caches}", fix)
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        yield Check("warn", "hub cache", f"{cache} is not writable", "set HF_HOME to a writable, shared directory")


def run_checks(cfg: RunConfig | None) -> list[Check]:
    checks: list[Check] = []
    cpu = cfg is not None and cfg.cluster.accelerator == "cpu"
    kernels = iter(()) if cpu else check_kernels(cfg)  # flash-attn and Liger are CUDA-only: not a CPU recipe's concern
    for group in (check_torch(), check_versions(), check_cuda(cfg), kernels, check_bitsandbytes(cfg), check_extras(cfg)):
        checks += group
    checks += check_output(cfg)
    checks += check_port(cfg)
    checks += check_offline()
    return checks


def doctor(cfg: RunConfig | None, label: str = "") -> int:
    """Print one line per check; 1 if any failed."""
    checks = run_checks(cfg)
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if c.status == "fail"]
    subject = f" for {label}" if label else ""
    if failed:
        print(f"doctor: {len(failed)} check(s) failed{subject}: {', '.join(failed)}")
        return 1
    print(f"doctor: ready{subject} ({sum(c.status == 'warn' for c in checks)} warning(s))")
    return 0


# --- `launcher doctor RECIPE --nodes N`: the checks on a real allocation (launcher/doctor_job.py) ---

DOCTOR_TIME = "00:10:00"  # the job's time limit: the checks take seconds once the nodes are up
JOIN_TIMEOUT = 120  # seconds the agents wait for every node at the rendezvous
COLLECTIVE_TIMEOUT = 120  # seconds any collective may wait before the job fails on it
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"}
)


def _agent_line(python: str, nodes: int, procs: int, settings_path: str) -> str:
    """The agent (torchrun) on one node, with job.sbatch's rendezvous: node 0 hosts the store. Literal
    paths: the line runs in each node's own bash, where only exported variables exist."""
    if nodes == 1:
        rdzv = "--standalone --nnodes 1"
    else:
        rdzv = (
            f'--nnodes {nodes} --rdzv_backend c10d --rdzv_endpoint "${{LAUNCHER_HEAD_ADDR}}:${{LAUNCHER_RDZV_PORT}}" '
            f'--rdzv_id "doctor-${{SLURM_JOB_ID}}" --rdzv_conf "is_host=${{LAUNCHER_IS_HOST}},join_timeout={JOIN_TIMEOUT}" '
            "--local-addr auto"
        )
    job = f"--nproc_per_node {procs} --max_restarts 0 -m launcher.doctor_job {shlex.quote(settings_path)}"
    return f"{shlex.quote(python)} -m launcher.agent {rdzv} \\\n    {job}"


def build_doctor_job(cfg: RunConfig, label: str, doctor_dir: str, python: str = sys.executable) -> tuple[str, dict[str, object]]:
    """(doctor.sbatch, doctor.json): the recipe's allocation for DOCTOR_TIME, and what the ranks check against."""
    import dataclasses

    from launcher.plan.estimate import estimate_plan
    from launcher.plan.network import env_defaults
    from launcher.plan.plan import default_run_dir, plan_env
    from launcher.plan.slurm import env_block, render_template, rendezvous_block, sbatch_headers
    from launcher.plan.topology import build_topology

    topology = build_topology(cfg.cluster, cfg.train, cfg.data)
    estimate = estimate_plan(cfg, topology)
    settings_path = str(Path(doctor_dir) / "doctor.json")
    settings: dict[str, object] = {
        "recipe": label,
        "run_dir": default_run_dir(cfg),
        "doctor_dir": doctor_dir,
        "accelerator": cfg.cluster.accelerator,
        "nodes": topology.nodes,
        "procs_per_node": topology.procs_per_node,
        "network": cfg.cluster.network,
        "keep_last": cfg.checkpoint.keep_last,
        "checkpoint_bytes": estimate["checkpoint_bytes"],
        "checkpoint_seconds": estimate["checkpoint_seconds"],
        "host_bytes": estimate["host_total"],
        "mem": cfg.cluster.mem,
        "gpu_memory_gib": estimate["gpu_memory_gib"],
        "model": cfg.model.name_or_path,
        "model_local_dir": cfg.model.local_dir,
        "collective_timeout": COLLECTIVE_TIMEOUT,
    }
    short = dataclasses.replace(cfg.cluster, time=DOCTOR_TIME, signal_seconds=0, requeue=False)
    script = render_template(
        "doctor.sbatch.tmpl",
        {
            "sbatch_headers": "\n".join(sbatch_headers(short, topology, f"doctor-{cfg.run.name}", doctor_dir)),
            "recipe": Path(label).name.replace("\n", " "),
            "version": __version__,
            "nodes": str(topology.nodes),
            "procs_per_node": str(topology.procs_per_node),
            "doctor_dir": shlex.quote(doctor_dir),
            "env_block": env_block(plan_env(cfg, topology), env_defaults(cfg.cluster)),
            "rendezvous": rendezvous_block(cfg.cluster),
            "cpus_per_task": str(cfg.cluster.cpus_per_task),
            "agent": _agent_line(python, topology.nodes, topology.procs_per_node, settings_path),
        },
    )
    return script, settings


def preemption_grace(partition: str, shown: str, save_seconds: float) -> Check:
    """The partition's preemption GraceTime (`scontrol show partition -o` output) against one save. A
    preempted job's ranks get SIGTERM, finish the step, agree to stop and save; SLURM kills them
    GraceTime seconds after the signal."""
    fields = dict(token.split("=", 1) for token in shown.split() if "=" in token)
    name = fields.get("PartitionName", partition or "the default partition")
    mode, grace = fields.get("PreemptMode", "OFF"), fields.get("GraceTime", "0")
    needed = 1.5 * save_seconds + 30  # the save, with room, plus the step in flight and the stop agreement
    if mode.upper().startswith("OFF"):
        return Check("ok", "preemption grace", f"partition {name} does not preempt (PreemptMode={mode})")
    if not grace.isdigit() or int(grace) < needed:
        return Check(
            "warn",
            "preemption grace",
            f"partition {name} preempts ({mode}) with GraceTime={grace}, under the ~{needed:.0f} s a save of ~{save_seconds:.0f} s "
            "needs: a preempted job loses the steps since its last checkpoint",
            "ask the admins for a longer GraceTime, or save more often (checkpoint.every)",
        )
    return Check(
        "ok", "preemption grace", f"partition {name} preempts ({mode}) with GraceTime={grace} s, for a save of ~{save_seconds:.0f} s"
    )


def _grace_check(partition: str, save_seconds: float) -> Check | None:
    """The grace check on the partition the job runs in (the default one when none is named)."""
    command = ["scontrol", "show", "partition", "-o", *([partition] if partition else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []
    chosen = next((line for line in lines if partition or "Default=YES" in line), None)
    return preemption_grace(partition, chosen, save_seconds) if chosen else None


def _job_state(job_id: str) -> str | None:
    """The job's state from scontrol (sacct once slurmctld has forgotten it); None if neither knows."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    for token in done.stdout.split() if done.returncode == 0 else ():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    if shutil.which("sacct"):
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=30)
        words = done.stdout.split()
        if done.returncode == 0 and words:
            return words[0]
    return None


def doctor_nodes(cfg: RunConfig, label: str, dry_run: bool = False, wait_seconds: float = 1800, poll: float = 1.0) -> int:
    """Write RUN/doctor/doctor.sbatch, submit it, wait for the job and print its report: 0 when every check passed."""
    from launcher.plan import default_run_dir
    from launcher.runfiles import replace_file

    doctor_dir = Path(default_run_dir(cfg)) / "doctor"
    script, settings = build_doctor_job(cfg, label, str(doctor_dir))
    (doctor_dir / "logs").mkdir(parents=True, exist_ok=True)
    replace_file(doctor_dir / "doctor.json", json.dumps(settings, indent=2) + "\n", 0o600)
    path = replace_file(doctor_dir / "doctor.sbatch", script, 0o700)
    command = ["sbatch", "--parsable", str(path)]
    if dry_run:
        print(script, end="")
        print(f"\ndry run, would submit: {shlex.join(command)}")
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch: not found on PATH; run on a SLURM login node (or leave out --nodes to check this machine)", file=sys.stderr)
        return 2
    done = subprocess.run(command, cwd=doctor_dir, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = done.stdout.strip().split(";")[0]
    print(f"doctor: job {job_id} on {settings['nodes']} node(s), waiting (report: {doctor_dir}/report-{job_id}.txt)", flush=True)
    grace = _grace_check(cfg.cluster.partition, float(settings["checkpoint_seconds"]))  # type: ignore[arg-type]
    if grace is not None:  # the login node's view of the partition, before the job's own checks
        print(grace.line(), flush=True)
    deadline, state = time.monotonic() + wait_seconds, _job_state(job_id)
    while state in ACTIVE_STATES and time.monotonic() < deadline:
        time.sleep(poll)
        state = _job_state(job_id)
    report = doctor_dir / f"report-{job_id}.txt"
    if state in ACTIVE_STATES:
        print(f"doctor: job {job_id} still {state} after {wait_seconds:.0f} s; its report will be {report} (scancel {job_id} to drop it)")
        return 1
    if not report.is_file():
        err = doctor_dir / "logs" / f"doctor-{cfg.run.name}-{job_id}.err"
        tail = err.read_text(errors="replace").splitlines()[-20:] if err.is_file() else []
        print("\n".join([f"fail  doctor job: {job_id} ended {state} without a report; the end of {err}:", *tail]))
        return 1
    lines = report.read_text().splitlines()
    print("\n".join(lines))
    return 0 if lines and lines[-1].startswith("doctor: ready") else 1
