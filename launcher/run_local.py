"""`launcher run` / `prepare`: what happens on the machine where the command is typed.

`run` starts the ranks itself (launcher/ranks.py: torchrun's one-node job without its agent), each in
its own session, so a Ctrl-C at the terminal reaches only this process, which passes exactly one
signal on to every rank (they save at the next step boundary and exit 75). A second Ctrl-C kills
every process the run started. The output is streamed, prefixed as torchrun does, and copied to
logs/launcher.log; a failed run ends with one line naming the rank that failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from launcher.config.errors import one_line
from launcher.plan import Plan
from launcher.plan.slurm import REQUEUE_EXIT_CODE
from launcher.plot import plot_after_run
from launcher.ranks import Ranks, Tee, send_signal, shell_code, start_piped
from launcher.runfiles import open_append, read_small, replace_file
from launcher.runtime.train.signals import STOP_SIGNALS

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
RUN_TOKEN = "LAUNCHER_RUN_TOKEN"


def prepare(plan: Plan) -> int:
    """Build the tiny model (in tiny mode) and the tokenised data cache, in this process."""
    from launcher.runtime.__main__ import main as runtime_main

    code = runtime_main(["--plan", plan.plan_path, "--prepare-only"])
    if code == 0:
        print(f"launcher: data prepared for {plan.run_dir}")
    return code


def run_local(plan: Plan) -> int:
    """Prepare, then run the ranks here; stream and log their output; return the run's exit code."""
    if plan.topology["nodes"] != 1:
        print(
            f"error: cluster.nodes: {plan.topology['nodes']} nodes cannot run on this machine; "
            "use `launcher submit`, or override cluster.nodes=1",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(plan.run_dir)
    logs = run_dir / "logs"
    with open_append(logs / "launcher.log") as log:  # never through a link planted there: refused before anything runs
        code, ran = _supervise(plan, log)
    if not ran:  # the data could not be prepared (it said why), or a signal came first
        return code
    if code not in (0, EXIT_INTERRUPTED) and (logs / "exit_code").exists():
        # The first rank to fail may be one that lost its peers; rank 0 recorded what the run meant (2 bad input, 75 saved).
        code = int((logs / "exit_code").read_text().strip() or code)
    if code == 0:
        write_state(run_dir, "done", job="local", attempt=1)
        plot_after_run(run_dir, plan.config["train"].get("plot", True))  # here, not on rank 0: the ranks have exited
    elif code == REQUEUE_EXIT_CODE:
        write_state(run_dir, "preempted", job="local", attempt=1)
    else:
        line = failure_line(run_dir, code)
        replace_file(logs / "failure", line + "\n")
        write_state(run_dir, "failed", job="local", attempt=1)
        print(f"launcher: {line}", file=sys.stderr, flush=True)
    return code


def _supervise(plan: Plan, log: IO[str]) -> tuple[int, bool]:
    """Prepare the data in a process of its own while rank 0 imports (launcher/ranks.py, zygote.py);
    then run the ranks; pass signals on; tee their output; leave no process behind. The exit code,
    and whether the ranks ran."""
    # Every process of the run inherits this token: found by it, even once re-parented to init.
    token = f"{os.getpid()}-{time.time_ns()}"
    # prepare has fetched the model and built the data before any rank reads them: the ranks need nothing from the Hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", RUN_TOKEN: token}
    lock = threading.Lock()

    def tee(line: str, sink: IO[str]) -> None:
        with lock:
            log.write(line)
            log.flush()
            with contextlib.suppress(OSError, ValueError):  # a closed terminal (SIGHUP) must not stop the pumps
                sink.write(line)
                sink.flush()

    ranks = Ranks(plan, env, tee)
    preparing: list[subprocess.Popen[str]] = []  # the data's process, while it runs
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            name = signal.Signals(signum).name
            if preparing:
                say(f"launcher: {name}: stopping the data preparation (run again to prepare again)")
                send_signal(preparing[0].pid, signal.SIGTERM)  # it stops at once (runtime/train/signals.py: stop_at_once)
            else:
                say(f"launcher: {name}: the ranks save at the next step boundary and stop (Ctrl-C again to stop at once)")
            ranks.send(signum)  # once, to every rank
        elif signum == signal.SIGINT:
            say("launcher: second Ctrl-C: stopping every process of the run now, without saving")
            _kill_all(token)

    # The signals a rank stops on, passed on (the ranks, in sessions of their own, get nothing from the
    # terminal): SIGHUP, the terminal closed; SIGQUIT, Ctrl-\.
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        ranks.spawn()  # forking: rank 0 imports torch and the rest while the data is prepared
        code = _prepare(plan, {**os.environ, RUN_TOKEN: token}, tee, preparing)
        if code != 0 or received:
            ranks.abort()
            return (EXIT_INTERRUPTED if signal.SIGINT in received else (code or REQUEUE_EXIT_CODE)), False
        _clear_last_attempt(plan)
        code = ranks.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _kill_all(token)  # whatever outlived its rank (a child it started, a rank that ignored a kill)
    if signal.SIGINT in received[1:]:
        return EXIT_INTERRUPTED, True
    return code, True


def _prepare(plan: Plan, env: dict[str, str], tee: Tee, preparing: list[subprocess.Popen[str]]) -> int:
    """`python -m launcher.runtime --prepare-only` in a process of its own (the tokenising never grows
    this one), its output teed here; its exit code."""
    argv = [plan.torchrun[0], "-m", "launcher.runtime", "--plan", plan.plan_path, "--prepare-only"]
    proc, pumps = start_piped(argv, env, tee, "")
    preparing.append(proc)
    code = proc.wait()
    for thread in pumps:
        thread.join(timeout=10)
    preparing.clear()
    if code == 0:
        tee(f"launcher: data prepared for {plan.run_dir}\n", sys.stdout)
    return shell_code(code)


def _clear_last_attempt(plan: Plan) -> None:
    """What an earlier run in this directory left that would speak for this one; the state: running."""
    run_dir = Path(plan.run_dir)
    logs = run_dir / "logs"
    (run_dir / "checkpoints" / "REQUEUE").unlink(missing_ok=True)
    for stale in (logs / "exit_code", logs / "failure", *(logs / "errors").glob("rank-*.json")):
        stale.unlink(missing_ok=True)
    write_state(run_dir, "running", job="local", attempt=1)
    world = plan.topology["world_size"]
    print(f"launcher: {world} process(es) on this machine (the same run under torchrun: bash {run_dir / 'launch.sh'})", flush=True)


def say(line: str) -> None:
    """One line on stderr from a signal handler: not through tee's lock (the main thread may hold it),
    and never an exception when the terminal is gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _run_pids(token: str) -> list[int]:
    """PIDs of live processes whose environment carries RUN_TOKEN=token (from /proc)."""
    marker = f"{RUN_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _kill_all(token: str) -> None:
    """SIGKILL every process the run started."""
    for pid in _run_pids(token):
        send_signal(pid, signal.SIGKILL)


# --- state and failures, shared with job.sbatch (`python -m launcher.run_local ...`) --------------


def write_state(run_dir: Path, state: str, job: str, attempt: int) -> None:
    """logs/state: `STATE JOB ATTEMPT TIME` (job.sbatch writes the same line)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    replace_file(run_dir / "logs" / "state", f"{state} {job} {attempt} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")


def rank_errors(run_dir: Path) -> list[dict]:
    """The ranks' error reports (runtime/parallel/dist.py), root cause first: a rank that only saw a broken
    connection to a dead peer comes after one that raised on its own; then by time."""
    found = []
    for path in sorted((run_dir / "logs" / "errors").glob("rank-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: (bool(r.get("secondary")), float(r.get("time", 0))))


def failure_line(run_dir: Path, code: int) -> str:
    """One line: which rank, which exception, where; or what is known without a report."""
    errors = rank_errors(run_dir)
    if not errors:
        return (
            f"failed with exit code {code}; no rank reported an exception (a rank was killed: out of memory, "
            f"a signal, a node failure); see {run_dir / 'logs'}"
        )
    first = errors[0]
    if first.get("secondary"):  # every report is a broken connection: the rank that broke it said nothing
        return (
            f"failed with exit code {code}: a rank died without an exception (out of memory, a signal, a node failure); "
            f"rank {first['rank']} on {first['host']} then lost its peers ({first['exception']}); see {run_dir / 'logs'}"
        )
    more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    return (
        f"failed: rank {first['rank']} on {first['host']}: {first['exception']}: {first['message']} "
        f"at {first['where']}{more}; full output in {run_dir / 'logs'}"
    )


def complete_checkpoints(run_dir: Path) -> Iterator[Path]:
    """Checkpoint folders with a COMPLETE marker, newest first (no torch: `status` and job.sbatch use it)."""
    root = run_dir / "checkpoints"
    for folder in sorted(root.glob("step-*"), reverse=True):
        if (folder / "COMPLETE").exists():
            yield folder


def last_complete(run_dir: Path) -> str:
    return next((p.name for p in complete_checkpoints(run_dir)), "none")


def _last_logged(metrics: Path) -> dict | None:
    """The last complete training record of metrics.jsonl (lines being written, or damaged, skipped)."""
    text = read_small(metrics, limit=1 << 22, tail=True)  # its last 4 MiB hold the last step
    if text is None:
        return None
    last = None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line still being written
            continue
        if isinstance(record, dict) and _step(record.get("step")) and _number(record.get("loss")) is not None:
            last = {**record, "loss": _number(record["loss"])}
    return last


def _step(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object) -> float | None:
    """A metrics value as a float, or None: not a number (a bool, a string) or past a float's range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def status(run_dir: str) -> int:
    """State (running, preempted, requeued, failed with its line, done), SLURM job and attempt, last
    logged step, last complete checkpoint. Whatever it finds in the run directory, it prints: a
    damaged or missing file is shown as unknown, never a traceback; what the files say is printed
    with its control characters escaped (a planted escape sequence cannot drive the terminal)."""
    folder = Path(run_dir)
    if read_small(folder / "plan.json", limit=1) is None:
        print(one_line(f"error: {run_dir}: not a run directory (no plan.json); give a folder `launcher plan` wrote"), file=sys.stderr)
        return 2
    for line in _status_lines(folder):
        print(one_line(line))
    return 0


def _status_lines(folder: Path) -> Iterator[str]:
    job = (read_small(folder / "logs" / "job_id") or "").strip()
    if job.isascii() and job.isdigit() and shutil.which("scontrol"):
        try:
            done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, errors="replace")
        except OSError:
            done = subprocess.CompletedProcess([], 1, "", "")
        fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
        state = fields.get("JobState", "unknown (not known to slurmctld any more)")
        restarts = fields.get("Restarts", "?")
        attempt = int(restarts) + 1 if restarts.isascii() and restarts.isdigit() else "?"
        yield f"job {job}: {state}  attempt {attempt}  restarts {restarts}  nodes {fields.get('NodeList', '?')}"
    text = read_small(folder / "logs" / "state")
    if text is not None:
        word, job_name, attempt, when = (text.split() + ["?"] * 4)[:4]
        failure = read_small(folder / "logs" / "failure") if word == "failed" else None
        reason = f": {failure.strip()}" if failure else ""
        yield f"state: {word} (job {job_name}, attempt {attempt}, since {when}){reason}"
    else:
        yield "state: not started"
    last = _last_logged(folder / "metrics.jsonl")
    if last is None:
        yield "step: none logged yet"
    else:
        lr, elapsed = _number(last.get("lr")), _number(last.get("elapsed"))
        extras = (f"  lr {lr:.2e}" if lr is not None else "") + (f"  elapsed {elapsed:.0f}s" if elapsed is not None else "")
        yield f"step {last['step']}  loss {last['loss']:.4f}{extras}"
    try:
        yield f"last complete checkpoint: {last_complete(folder)}"
    except OSError as exc:  # a checkpoints folder it may not read
        yield f"last complete checkpoint: unknown ({exc.strerror})"


def main(argv: list[str]) -> int:
    """job.sbatch's helpers: `last-complete RUN_DIR`, `failure-line RUN_DIR CODE`, `state RUN_DIR STATE JOB ATTEMPT`."""
    match argv:
        case ["last-complete", run_dir]:
            print(last_complete(Path(run_dir)))
        case ["failure-line", run_dir, code]:
            print(failure_line(Path(run_dir), int(code)))
        case ["state", run_dir, state, job, attempt]:
            write_state(Path(run_dir), state, job, int(attempt))
        case _:
            print(f"usage: python -m launcher.run_local {main.__doc__}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
