"""launcher/ranks.py, torchrun's one-node job in the `launcher run` process: each rank's environment,
the prefixed output, the first failure stopping the others, a kill named, restarts; each both ways
the ranks start: forked from rank 0's interpreter (launcher/zygote.py, the default on Linux) and
each its own fresh interpreter (LAUNCHER_FORK_RANKS=0). The workers here are a few lines of Python
standing in for `python -m launcher.runtime` (no torch); the real runtime under it is run by every
integration test that calls `launcher run`."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan import build_plan
from launcher.ranks import Ranks, rank_env

ROOT = Path(__file__).resolve().parents[2]

# A stand-in rank: prints its environment, then acts on FAKE_<RANK>: exit N, save on SIGTERM ("hang"),
# ignore SIGTERM ("deaf"), kill itself, fail once ("restart"), or exit N once rank 0 is ready
# ("waitN": rank 0's SIGTERM handler is in place, so the test never races its start).
WORKER = r"""
import os, pathlib, signal, sys, time
r = os.environ["RANK"]
act = os.environ.get("FAKE_" + r, "0")
if act == "hang":  # a real rank saves on SIGTERM and exits 75
    signal.signal(signal.SIGTERM, lambda *a: (print("saved", r, flush=True), os._exit(75)))
if act == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("env", r, os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
      os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["OMP_NUM_THREADS"], flush=True)
print("to stderr", r, file=sys.stderr, flush=True)
# launcher run's own child (forked ones adopted), in a session of its own; the rendezvous socket and the zygote's pipes rank 0's alone
print("parent", r, os.getppid() == int(os.environ["LAUNCHER_SUPERVISOR_PID"]), os.getsid(0) == os.getpid(),
      sorted(k for k in os.environ if k.startswith(("LAUNCHER_ZYGOTE", "LAUNCHER_STORE"))), flush=True)
ready = pathlib.Path(os.environ["FAKE_DIR"], "ready-" + r)
ready.touch()
if act in ("hang", "deaf"):
    time.sleep(60)
if act == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if act.startswith("wait"):
    while not ready.with_name("ready-0").exists():
        time.sleep(0.01)
    act = act[4:]
if act.startswith("restart") and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    sys.exit(int(act[7:] or 1))
if r == "0" and "LAUNCHER_STORE_FD" in os.environ:  # the rendezvous socket, handed over listening
    import socket
    store = socket.socket(fileno=int(os.environ["LAUNCHER_STORE_FD"]))
    assert store.getsockname()[1] == int(os.environ["MASTER_PORT"]) and store.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    print("store", r, os.environ["GROUP_WORLD_SIZE"], os.environ["TORCHELASTIC_ERROR_FILE"], os.environ["LAUNCHER_SUPERVISOR_PID"], flush=True)
sys.exit(int(act) if act.isdigit() else 0)
"""


@pytest.fixture(params=["forked", "exec"], autouse=True)
def start_mode(request, monkeypatch):
    monkeypatch.setenv("LAUNCHER_FORK_RANKS", "1" if request.param == "forked" else "0")
    return request.param


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return build_plan(load_config(ROOT / "recipes" / "tiny-cpu.yaml"), str(tmp_path_factory.mktemp("fake")))


def _run(plan, fake: dict[str, str], tmp: Path, send: int | None = None) -> tuple[int, str, str, float]:
    """Run the stand-in ranks; with `send`, pass that signal on once every rank has started."""
    out, err = io.StringIO(), io.StringIO()
    started = threading.Semaphore(0)

    def tee(line: str, sink) -> None:
        (err if sink is sys.stderr else out).write(line)
        if ":env " in line:
            started.release()

    ranks = Ranks(plan, {"PATH": "/usr/bin:/bin", "FAKE_DIR": str(tmp), **fake}, tee, argv=[sys.executable, "-c", WORKER])
    if send is not None:

        def later() -> None:
            for _ in range(2):
                started.acquire()  # both have started (each installed its handler before its first line)
            deadline = time.monotonic() + 60
            # and both are done printing (ready-N comes after their last line): a handler's own line
            # cannot land inside one of them. Polled, not a fixed wait: a loaded machine takes longer.
            while not all((tmp / f"ready-{r}").exists() for r in "01") and time.monotonic() < deadline:
                time.sleep(0.01)
            ranks.send(send)

        threading.Thread(target=later, daemon=True).start()
    start = time.monotonic()
    code = ranks.run()
    return code, out.getvalue(), err.getvalue(), time.monotonic() - start


def test_each_rank_gets_torchruns_environment_and_a_prefix(plan, tmp_path):
    code, out, err, _ = _run(plan, {}, tmp_path)
    assert code == 0, err
    envs = sorted(line.split(":", 1)[1].split() for line in out.splitlines() if "env" in line)
    port = envs[0][5]
    assert envs == [["env", "0", "0", "2", "127.0.0.1", port, "0", "1"], ["env", "1", "1", "2", "127.0.0.1", port, "0", "1"]]
    assert "[default0]:env 0" in out and "[default1]:env 1" in out  # torchrun's prefixes, by stream
    assert "[default0]:to stderr 0" in err and "[default1]:to stderr 1" in err
    # Rank 0 got the rendezvous port still bound and listening (nobody could take it in between).
    [store] = [line.split(":", 1)[1].split() for line in out.splitlines() if ":store " in line]
    assert store == ["store", "0", "1", f"{plan.run_dir}/logs/torchrun/attempt_0/0/error.json", str(os.getpid())]
    parents = sorted(line.split(":", 1)[1].strip() for line in out.splitlines() if ":parent " in line)
    assert parents == ["parent 0 True True ['LAUNCHER_STORE_FD']", "parent 1 True True ['LAUNCHER_STORE_CLIENT']"]


# A stand-in runtime module with the zygote's hooks: what preload did, in which process, and whether
# the stop signals are still held when main() begins (it unblocks them, as the runtime does).
PRELOADING = r"""
import os, signal, threading, time
PRELOADED = None

def preload(args):
    global PRELOADED
    PRELOADED = (os.getpid(), args)
    if os.environ.get("STANDIN_THREAD"):  # a library that starts a thread at import
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()

def main(args):
    held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    pid, seen = PRELOADED
    print("preloaded", os.environ["RANK"], pid == os.getpid(), seen == args, held, flush=True)
    return 0

if __name__ == "__main__":
    print("fresh", os.environ["RANK"], flush=True)
"""


def test_forked_ranks_begin_from_rank_zeros_preload_with_the_stop_signals_held(plan, tmp_path, start_mode):
    (tmp_path / "standin_runtime.py").write_text(PRELOADING)
    out = io.StringIO()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    ranks = Ranks(plan, env, lambda line, sink: out.write(line), argv=[sys.executable, "-m", "standin_runtime", "--plan", "x"])
    assert ranks.run() == 0
    lines = sorted(line.split(":", 1)[1].split() for line in out.getvalue().splitlines() if "preloaded" in line)
    if start_mode == "forked":  # rank 0 preloaded in its own process, rank 1 was forked from it afterwards
        assert lines == [["preloaded", "0", "True", "True", "True"], ["preloaded", "1", "False", "True", "True"]]
    else:
        assert lines == []  # without the zygote nothing calls main(): the module ran as a script


def test_after_imports_that_start_a_thread_the_other_ranks_are_fresh_interpreters(plan, tmp_path, start_mode):
    """Copying a process with a second thread running could deadlock on a lock it held: not forked on."""
    if start_mode == "exec":
        pytest.skip("only the forked start copies rank 0")
    (tmp_path / "standin_runtime.py").write_text(PRELOADING)
    out, err = io.StringIO(), io.StringIO()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "STANDIN_THREAD": "1"}
    tee = lambda line, sink: (err if sink is sys.stderr else out).write(line)  # noqa: E731
    ranks = Ranks(plan, env, tee, argv=[sys.executable, "-m", "standin_runtime", "--plan", "x"])
    assert ranks.run() == 0
    assert "[default0]:preloaded 0 True True True" in out.getvalue() and "[default1]:fresh 1" in out.getvalue()
    assert "2 threads after rank 0's imports" in err.getvalue()


def test_the_first_failure_sets_the_code_and_stops_the_others(plan, tmp_path):
    # Rank 1 fails at once; rank 0 would run for 60 s but saves and exits 75 on the SIGTERM it gets.
    code, out, err, took = _run(plan, {"FAKE_0": "hang", "FAKE_1": "wait7"}, tmp_path)
    assert code == 7 and took < 20, (code, took, err)
    assert "launcher: rank 1 exited with code 7; stopping the other ranks" in err
    assert "[default0]:saved 0" in out


def test_a_killed_rank_is_named_and_reads_128_plus_the_signal(plan, tmp_path):
    code, _, err, _ = _run(plan, {"FAKE_0": "hang", "FAKE_1": "kill"}, tmp_path)
    assert code == 128 + signal.SIGKILL
    assert "launcher: rank 1 was killed by SIGKILL; stopping the other ranks" in err
    assert "launcher: rank 1 (pid " in err and ") was killed by SIGKILL" in err


def test_a_failed_group_is_restarted_up_to_max_restarts(tmp_path):
    plan = build_plan(load_config(ROOT / "recipes" / "tiny-cpu.yaml", ["cluster.max_restarts=1"]), str(tmp_path / "run"))
    code, out, err, _ = _run(plan, {"FAKE_0": "restart", "FAKE_1": "restart"}, tmp_path)
    assert code == 0, err
    assert "launcher: restarting the ranks (1 of cluster.max_restarts=1)" in err
    assert sorted(line.split()[6] for line in out.splitlines() if " env " in f" {line.split(':', 1)[1]}") == ["0", "0", "1", "1"]


def test_bad_input_is_not_restarted(tmp_path):
    plan = build_plan(load_config(ROOT / "recipes" / "tiny-cpu.yaml", ["cluster.max_restarts=1"]), str(tmp_path / "run"))
    code, _, err, _ = _run(plan, {"FAKE_0": "restart2", "FAKE_1": "restart2"}, tmp_path)
    assert code == 2 and "restarting" not in err, err


def test_a_signal_reaches_every_rank_once_and_is_not_restarted(plan, tmp_path):
    code, out, err, took = _run(plan, {"FAKE_0": "hang", "FAKE_1": "hang"}, tmp_path, send=signal.SIGTERM)
    assert code == 75 and took < 20, (code, err)
    assert "[default0]:saved 0" in out and "[default1]:saved 1" in out
    assert "stopping the other ranks" not in err and "restarting" not in err


def test_a_rank_deaf_to_sigterm_is_killed_after_the_grace_period(plan, tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.ranks.FAILURE_GRACE_SECONDS", 1)  # torchrun's 30 s after a failure
    code, _, err, took = _run(plan, {"FAKE_0": "deaf", "FAKE_1": "wait5"}, tmp_path)
    assert code == 5 and took < 20
    assert "launcher: ranks still running after the grace period; killing them" in err


def test_after_a_signal_ranks_still_running_at_the_shutdown_timeout_are_killed(plan, tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.ranks.shutdown_timeout", lambda seconds: 1)  # cluster.signal_seconds, >= 2 min
    code, out, err, took = _run(plan, {"FAKE_0": "hang", "FAKE_1": "deaf"}, tmp_path, send=signal.SIGTERM)
    assert "[default0]:saved 0" in out and took < 20
    assert code == 75  # rank 0 saved first; rank 1 was then killed
    assert "launcher: ranks still running after the grace period; killing them" in err and "stopping the other" not in err


def test_rank_env_is_the_plans_env_under_the_rank_variables(plan):
    env = rank_env({"RANK": "9", "KEEP": "1"}, plan, 1, 29511, 0)
    assert env["RANK"] == "1" and env["KEEP"] == "1" and env["PYTHONSAFEPATH"] == "1"
    assert env["TORCHELASTIC_MAX_RESTARTS"] == "0" and env["TORCHELASTIC_RUN_ID"] == plan.config["run"]["name"]


def test_rank_env_has_the_plans_defaults_under_the_environment(plan):
    """launch.sh's `: "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"`, as launcher run starts the ranks."""
    import dataclasses

    gpu = dataclasses.replace(plan, env_defaults={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert rank_env({}, gpu, 0, 29511, 0)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert rank_env({"PYTORCH_CUDA_ALLOC_CONF": "mine"}, gpu, 0, 29511, 0)["PYTORCH_CUDA_ALLOC_CONF"] == "mine"
