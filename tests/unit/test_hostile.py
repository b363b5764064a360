"""The team's hostile-input corpus: every case is exit 2, one `error:` line per problem naming the key
or the file, no traceback, nothing created or changed on disk, and a few seconds at most.

Cases run in-process through `launcher.cli.main` (a few as real subprocesses at the end). Each
gets its own working directory, so a stray write anywhere under it is seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...] = ()  # on tiny-cpu.yaml unless `recipe` is given
    recipe: str | bytes | None = None  # the whole recipe file (written to r.yaml)
    files: dict[str, str | bytes] = field(default_factory=dict)  # more files next to it
    out: str | None = None  # --out (default: a fresh folder)
    config_json: dict | None = None  # a local model directory with this config.json
    names: tuple[str, ...] = ()  # each must appear in the error output


CONTROL = {"nl": "\n", "cr": "\r", "nul": "\x00", "esc": "\x1b", "del": "\x7f", "ls": "\u2028", "nel": "\x85", "tab": "\t", "bell": "\x07"}
STRING_KEYS = [
    "run.output_dir",
    "run.name",
    "model.name_or_path",
    "data.path",
    "data.val_path",
    "data.cache_dir",
    "data.split",
    "data.prompt_field",
    "parallel.nvme_path",
    "checkpoint.resume",
    "cluster.partition",
    "cluster.account",
    "cluster.qos",
    "cluster.time",
    "cluster.mem",
    "cluster.constraint",
]
FLOAT_KEYS = [
    "method.lora.dropout",
    "data.val_fraction",
    "optim.lr",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.min_lr_ratio",
    "optim.max_grad_norm",
]
INT_KEYS = [
    "run.seed",
    "train.max_steps",
    "train.micro_batch_size",
    "train.log_every",
    "cluster.nodes",
    "checkpoint.every",
    "data.max_seq_len",
]
ARCH_KEYS = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"]
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


def _cases() -> list[Case]:
    cases: list[Case] = []
    for key in STRING_KEYS:
        for name, ch in CONTROL.items():
            cases.append(Case(f"control-{name}-{key}", (f"{key}=a{ch}b",), names=(key,)))
    for key in FLOAT_KEYS:
        for text in (".nan", ".NaN", ".inf", "-.inf"):
            cases.append(Case(f"nonfinite-{key}={text}", (f"{key}={text}",), names=(key,)))
    for key in INT_KEYS:
        for value in (2**63, 2**64, 10**30, -(2**64)):
            cases.append(Case(f"huge-{key}={value}", (f"{key}={value}",), names=(key,)))
    cases += [
        Case("override-deep-key", ("a." * 5000 + "b=1",), names=("key=value",)),
        Case("override-no-equals", ("train.max_steps",), names=("train.max_steps",)),
        Case("override-empty-key", ("=5",), names=("key=value",)),
        Case("override-empty-part", ("train..max_steps=5",), names=("train..max_steps",)),
        Case("override-key-newline", ("run.na\nme=x",), names=("run.na\\nme",)),
        Case("override-value-bomb", ("cluster.env=" + "[" * 100 + "]" * 100,), names=("cluster.env",)),
        Case("override-value-alias-bomb", ("method.lora.target_modules=[&a [x, x, x], *a, *a]",), names=("method.lora.target_modules",)),
        Case("override-value-dup", ("cluster.env={A: 1, A: 2}",), names=("cluster.env", "twice")),
        Case("seed-negative", ("run.seed=-1",), names=("run.seed",)),
        Case("seed-2**63", (f"run.seed={2**63}",), names=("run.seed",)),
        Case("qlora-zero0", ("method.name=qlora", "parallel.backend=deepspeed", "parallel.zero_stage=0"), names=("parallel.zero_stage",)),
        Case("qlora-zero1", ("method.name=qlora", "parallel.backend=deepspeed", "parallel.zero_stage=1"), names=("parallel.zero_stage",)),
    ]
    nested = {
        "method.lora.target_modules": ("[[q_proj]]", "[{a: 1}]", "[q_proj, [v_proj]]", "[[]]"),
        "cluster.extra_sbatch": ("[[--exclusive]]", "[{a: b}]", "[--exclusive, [x]]"),
        "cluster.env": ("{A: {b: 1}}", "{A: [1, 2]}", "{A: null}", "{A: []}", "{A: {}}"),
    }
    for key, texts in nested.items():
        for text in texts:
            cases.append(Case(f"nested-{key}={text}", (f"{key}={text}",), names=(key,)))
    for key, resolver in (
        ("cluster.env", "{HF_TOKEN: '${oc.env:HF_TOKEN}'}"),
        ("cluster.env", "{A: 'x${oc.env:HOME}'}"),
        ("run.name", "${oc.env:USER}"),
        ("data.path", "${oc.env:HOME}/data.jsonl"),
        ("model.name_or_path", "${oc.decode:abc}"),
        ("run.output_dir", "/tmp/${oc.env:HOME}"),
    ):
        cases.append(Case(f"resolver-{key}={resolver}", (f"{key}={resolver}",), names=(key,)))
    for name, out in (
        ("nl", "out\nb"),
        ("sbatch", "o\n#SBATCH --wrap=id"),
        ("nul", "o\x00b"),
        ("cr", "o\rb"),
        ("esc", "o\x1b[31m"),
        ("quote", 'o"b'),
        ("percent", "o%jb"),
        ("backslash", "o\\b"),
        ("ls", "o\u2028b"),
        ("tab", "o\tb"),
        ("del", "o\x7fb"),
    ):
        cases.append(Case(f"out-{name}", out=out, names=("--out",)))
    cases += _file_cases()
    for key in ARCH_KEYS:
        for bad in (0, -3, "wide", True, 1.5, 2**40, [8]):
            cases.append(Case(f"config.json-{key}={bad!r}", config_json={**LLAMA, key: bad}, names=("config.json", key)))
    cases.append(Case("config.json-kv-heads-divide", config_json={**LLAMA, "num_key_value_heads": 3}, names=("num_key_value_heads",)))
    return cases


def _file_cases() -> list[Case]:
    """Whole recipe files: encodings, sizes, YAML bombs, duplicate keys, `base:` lookups."""
    good = "run:\n  name: t\n"
    deep_flow = "model: " + "[" * 200 + "]" * 200 + "\n"
    deep_map = "".join("  " * i + f"k{i}:\n" for i in range(120)) + "  " * 120 + "v: 1\n"
    chain = "a: &a [x]\n" + "".join(f"a{i}: &a{i} [*{'a' if i == 0 else f'a{i - 1}'}]\n" for i in range(60))
    cases = [
        Case("empty", recipe="", names=("r.yaml", "empty")),
        Case("comment-only", recipe="# nothing here\n# at all\n", names=("r.yaml", "empty")),
        Case("blank-lines", recipe="\n\n   \n", names=("r.yaml", "empty")),
        Case("document-marker", recipe="---\n", names=("r.yaml", "empty")),
        Case("null-document", recipe="~\n", names=("r.yaml", "empty")),
        Case("list-document", recipe="- a\n- b\n", names=("r.yaml", "mapping")),
        Case("scalar-document", recipe="42\n", names=("r.yaml", "mapping")),
        Case("two-documents", recipe="run: {}\n---\nrun: {}\n", names=("r.yaml",)),
        Case("utf16-le-bom", recipe=("\ufeff" + good).encode("utf-16-le"), names=("r.yaml", "UTF-16")),
        Case("utf16-be-bom", recipe=("\ufeff" + good).encode("utf-16-be"), names=("r.yaml", "UTF-16")),
        Case("utf16-le-nobom", recipe=good.encode("utf-16-le"), names=("r.yaml", "UTF-16")),
        Case("utf16-be-nobom", recipe=good.encode("utf-16-be"), names=("r.yaml", "UTF-16")),
        Case("utf32", recipe=good.encode("utf-32"), names=("r.yaml",)),
        Case("latin1", recipe="run:\n  name: caf\xe9\n".encode("latin-1"), names=("r.yaml", "UTF-8")),
        Case("binary", recipe=bytes(range(256)) * 4, names=("r.yaml",)),
        Case("png", recipe=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, names=("r.yaml",)),
        Case("gzip", recipe=b"\x1f\x8b\x08\x00" + bytes(60), names=("r.yaml",)),
        Case("nul-inside", recipe=b"run:\n  name: a\x00b\n", names=("r.yaml", "binary")),
        Case("too-large-comment", recipe="#" * 1_100_000 + "\n", names=("r.yaml", "bytes")),
        Case("too-large-keys", recipe="".join(f"k{i}: {i}\n" for i in range(120_000)), names=("r.yaml",)),
        Case("many-events", recipe="".join(f"k{i}: {i}\n" for i in range(30_000)), names=("r.yaml", "YAML nodes")),
        Case("many-unknown-keys", recipe="".join(f"unknown{i}: 1\n" for i in range(500)), names=("unknown0", "more unknown keys")),
        Case("deep-flow", recipe=deep_flow, names=("r.yaml", "nested")),
        Case("deep-map", recipe=deep_map, names=("r.yaml", "nested")),
        Case("deep-under-known-key", recipe="method:\n  lora:\n    target_modules: " + "[" * 100 + "]" * 100 + "\n", names=("r.yaml",)),
        Case("alias-bomb", recipe=BOMB, names=("r.yaml", "aliases")),
        Case("alias-bomb-known-key", recipe=BOMB + "method:\n  lora:\n    target_modules: *i\n", names=("r.yaml", "aliases")),
        Case("alias-bomb-env", recipe=BOMB + "cluster:\n  env: {A: *i}\n", names=("r.yaml", "aliases")),
        Case("alias-depth-chain", recipe=chain, names=("r.yaml", "nested")),
        Case("recursive-anchor", recipe="a: &a [*a]\n", names=("r.yaml",)),
        Case("recursive-map", recipe="a: &a {b: *a}\n", names=("r.yaml",)),
        Case("dup-leaf", recipe="train:\n  max_steps: 1\n  max_steps: 2\n", names=("r.yaml", "max_steps", "twice")),
        Case("dup-section", recipe="train:\n  max_steps: 1\ntrain:\n  log_every: 2\n", names=("r.yaml", "train", "twice")),
        Case("dup-flow", recipe="optim: {lr: 0.1, lr: 0.2}\n", names=("r.yaml", "lr", "twice")),
        Case("dup-base", recipe=f"base: {TINY}\nbase: {TINY}\n", names=("r.yaml", "base", "twice")),
        Case("python-tag", recipe="run: !!python/object/apply:os.system [touch PWNED]\n", names=("r.yaml",)),
        Case("python-name-tag", recipe="run: !!python/name:os.system\n", names=("r.yaml",)),
        Case("binary-tag", recipe="data:\n  path: !!binary aGVsbG8=\n", names=("data.path",)),
        Case("tab-indent", recipe="run:\n\tname: x\n", names=("r.yaml", "YAML")),
        Case("unclosed", recipe="train: {max_steps: [1, 2\n", names=("r.yaml", "YAML")),
        Case("mapping-values", recipe="a: b: c\n", names=("r.yaml", "YAML")),
        Case("unhashable-key", recipe="? [a, b]\n: 1\n", names=("r.yaml",)),
        Case("int-key", recipe="1: 2\n", names=("1",)),
        Case("null-key", recipe="~: 2\n", names=("None",)),
        Case("section-scalar", recipe="train: 5\n", names=("train",)),
        Case("section-list", recipe="train: [1]\n", names=("train",)),
        Case("undefined-alias", recipe="a: *nope\n", names=("r.yaml",)),
        Case("bad-escape", recipe='run: {name: "\\q"}\n', names=("r.yaml",)),
        Case("control-in-file", recipe='run:\n  output_dir: "/tmp/a\\nb"\n', names=("run.output_dir",)),
        Case("control-env-name", recipe='cluster:\n  env: {"A\\nB": x}\n', names=("cluster.env",)),
        Case("env-value-esc", recipe='cluster:\n  env: {A: "x\\x1by"}\n', names=("cluster.env.A",)),
        Case("base-dev-zero", recipe="base: /dev/zero\n", names=("/dev/zero", "regular file")),
        Case("base-dev-null", recipe="base: /dev/null\n", names=("/dev/null",)),
        Case("base-dev-urandom", recipe="base: /dev/urandom\n", names=("/dev/urandom",)),
        Case("base-proc-environ", recipe="base: /proc/self/environ\n", names=("environ",)),
        Case("base-directory", recipe="base: /tmp\n", names=("/tmp",)),
        Case("base-missing", recipe="base: no-such-recipe.yaml\n", names=("base", "no-such-recipe.yaml", "shipped recipes")),
        Case("base-missing-abs", recipe="base: /no/such/recipe.yaml\n", names=("base", "/no/such/recipe.yaml")),
        Case("base-self", recipe="base: r.yaml\n", names=("base", "cycle")),
        Case("base-newline", recipe='base: "a\\nb.yaml"\n', names=("base",)),
        Case("base-nul", recipe='base: "a\\0b.yaml"\n', names=("base",)),
        Case("base-int", recipe="base: 5\n", names=("base",)),
        Case("base-list", recipe="base: [a.yaml]\n", names=("base",)),
        Case("base-empty", recipe="base: ''\n", names=("base",)),
        Case("base-utf16", recipe="base: b.yaml\n", files={"b.yaml": good.encode("utf-16")}, names=("b.yaml", "UTF-16")),
        Case("base-binary", recipe="base: b.yaml\n", files={"b.yaml": bytes(range(256))}, names=("b.yaml",)),
        Case("base-huge", recipe="base: b.yaml\n", files={"b.yaml": "#" * 1_100_000}, names=("b.yaml", "bytes")),
        Case("base-empty-file", recipe="base: b.yaml\n", files={"b.yaml": "# only a comment\n"}, names=("b.yaml", "empty")),
        Case("base-bomb", recipe="base: b.yaml\n", files={"b.yaml": BOMB}, names=("b.yaml", "aliases")),
        Case("base-cycle", recipe="base: b.yaml\n", files={"b.yaml": "base: r.yaml\n"}, names=("base", "cycle")),
        Case("base-dup", recipe="base: b.yaml\n", files={"b.yaml": "run: {name: a, name: b}\n"}, names=("b.yaml", "twice")),
        Case("base-fifo", recipe="base: fifo.yaml\n", files={"fifo.yaml": "FIFO"}, names=("fifo.yaml", "regular file")),
        Case("recipe-fifo", recipe="FIFO", names=("r.yaml", "regular file")),
    ]
    return cases


CASES = _cases()


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 300, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "case ids are unique"


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_fifo():
            out[str(path)] = (path.stat().st_mode, b"")
        elif path.is_file():
            out[str(path)] = (path.stat().st_mode, path.read_bytes())
        else:
            out[str(path)] = (path.stat().st_mode, b"<dir>")
    return out


def _write(path: Path, content: str | bytes) -> None:
    if content == "FIFO":
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def _argv(case: Case, work: Path) -> list[str]:
    recipe = TINY
    if case.recipe is not None:
        _write(work / "r.yaml", case.recipe)
        recipe = str(work / "r.yaml")
    for name, content in case.files.items():
        _write(work / name, content)
    overrides = list(case.overrides)
    if case.config_json is not None:
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(case.config_json))
        overrides.append(f"model.name_or_path={work / 'model'}")
    return ["plan", recipe, *overrides, "--out", case.out if case.out is not None else str(work / "out")]


@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", CASES, ids=[ascii(c.id)[1:-1] for c in CASES])
def test_hostile_input_is_refused_cleanly(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = _argv(case, work)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err + captured.out
    assert all(";" in line for line in lines), f"every line says how to fix it: {err}"
    for name in case.names:
        assert name in err, f"{name!r} not named in: {err}"
    assert _snapshot(tmp_path) == before, "nothing created or changed on disk"
    assert not (work / "PWNED").exists()


SUBPROCESS = ["out-sbatch", "utf16-le-bom", "alias-bomb-known-key", "base-dev-zero", "deep-flow", "config.json-num_attention_heads=0"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", SUBPROCESS)
def test_hostile_input_as_a_user_runs_it(name: str, tmp_path: Path) -> None:
    """The same through `python -m launcher`: the exit status and stderr a shell sees."""
    case = next(c for c in CASES if c.id == name)
    work = tmp_path / "cwd"
    work.mkdir()
    argv = _argv(case, work)
    before = _snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "launcher", *argv], capture_output=True, text=True, cwd=work, timeout=30)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr
    assert _snapshot(tmp_path) == before


# Values the validation lets through on purpose (a directory may have spaces, quotes, `$`): they
# must reach the scripts as data. Each is used as --out and as a cluster.env value, and both
# scripts are executed with stand-ins for python, srun, scontrol, scancel and getent.
LEGAL_BUT_HOSTILE = {
    "subshell": "o $(touch PWNED_a)",
    "backticks": "o `touch PWNED_b`",
    "semicolon": "o; touch PWNED_c",
    "quotes": "o 'q' $HOME",
    "ampersand": "o && touch PWNED_d || touch PWNED_e",
    "redirect": "o > PWNED_f < /dev/null",
    "glob-brace": "o * ? [x] {a,b} ~ !",
    "hash": "o #SBATCH --wrap=touch PWNED_g",
    "dollar-var": "o $PATH $0 $@ $$",
    "leading-dash": "-o --help",
}


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(LEGAL_BUT_HOSTILE))
def test_legal_hostile_values_never_execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.config import load_config
    from launcher.plan import build_plan, write_run_dir

    value = LEGAL_BUT_HOSTILE[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    _stub(bin_dir / "python", f'printf "%s\\0" "$@" > {record}.argv; printf "%s" "$HOSTILE" > {record}.env\n')
    _stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done; exec "$@"\n')
    _stub(bin_dir / "scontrol", "if [[ $1 == show ]]; then echo node1; fi\n")
    _stub(bin_dir / "scancel", "exit 0\n")
    _stub(bin_dir / "getent", 'if [[ $1 == ahostsv4 && $2 == node1 ]]; then echo "10.0.0.5 STREAM node1"; else exit 2; fi\n')
    env_value = {"HOSTILE": value}
    cfg = load_config(TINY, ["cluster.nodes=2", "cluster.gpus_per_node=1", f"cluster.env={json.dumps(env_value)}"])
    run_dir = str(work / value)
    assert main(["validate", TINY, f"run.output_dir={run_dir}"]) == 0, "accepted on purpose"
    plan = build_plan(cfg, run_dir, python=str(bin_dir / "python"))
    write_run_dir(plan)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1"}
    for script, extra in (("job.sbatch", {}), ("launch.sh", {"LAUNCHER_HEAD_ADDR": "node1"})):
        Path(f"{record}.argv").unlink(missing_ok=True)
        done = subprocess.run(
            ["bash", str(Path(run_dir) / script)], cwd=work, env={**env, **extra}, capture_output=True, text=True, timeout=50
        )
        assert done.returncode == 0, done.stdout + done.stderr
        argv = Path(f"{record}.argv").read_text().split("\0")[:-1]
        assert argv[-2:] == ["--plan", str(Path(run_dir) / "plan.json")], argv
        assert Path(f"{record}.env").read_text() == value
    headers = [line for line in (Path(run_dir) / "job.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert not any(line.startswith("#SBATCH --wrap") for line in headers), "a value became an #SBATCH line"
    pwned = sorted(p.name for p in tmp_path.rglob("PWNED*"))
    assert pwned == [], f"a value was executed: {pwned}"


def test_checkpoint_files_are_data_never_code(tmp_path: Path) -> None:
    """No process group: a real DCP checkpoint of a small module, then planted pickles in it."""
    import pickle
    import random

    import torch
    import torch.distributed.checkpoint as dcp

    from launcher.plan.resume import crc32, is_complete
    from launcher.runtime.state import safe_state

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_opt.step()
    target = {"model": fresh.state_dict(), "optim": fresh_opt.state_dict()}
    safe_state.safe_load(target, tmp_path / "ck", no_dist=True)
    assert torch.equal(target["model"]["weight"], model.weight) and target["optim"]["param_groups"][0]["lr"] == 1e-3

    (tmp_path / "rng").mkdir()
    safe_state.save_rng(tmp_path, 0)
    expected = (random.random(), torch.rand(1).item())
    safe_state.load_rng(tmp_path, 0)
    assert (random.random(), torch.rand(1).item()) == expected, "RNG state restored from JSON"

    marker = tmp_path / "PWNED"

    class Plant:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Plant()))
    with pytest.raises(safe_state.CheckpointError, match="not allowed in checkpoint metadata"):
        safe_state.safe_load(target, tmp_path / "ck", no_dist=True)
    (tmp_path / "rng" / "rank-00000.json").write_bytes(pickle.dumps(Plant()))
    with pytest.raises(safe_state.CheckpointError, match="not a valid RNG state"):
        safe_state.load_rng(tmp_path, 0)
    assert not marker.exists()

    # Same-size corruption: sizes agree, the CRC-32 does not.
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "shard").write_bytes(b"abcdef")
    (folder / "manifest.json").write_text(json.dumps({"step": 1, "files": {"shard": 6}, "checksums": {"shard": crc32(folder / "shard")}}))
    (folder / "COMPLETE").write_text("")
    assert is_complete(folder, verify=True) == (True, "")
    (folder / "shard").write_bytes(b"abcdeX")
    assert is_complete(folder)[0] and "checksum" in is_complete(folder, verify=True)[1]


def test_foreign_pickles_are_refused_before_a_library_loads_them(tmp_path: Path) -> None:
    """DeepSpeed reads its own files with weights_only=False: they are scanned first, with stubs."""
    import pickle

    import torch

    from launcher.runtime.state.safe_state import CheckpointError, pickle_globals, refuse_foreign_pickles

    marker = tmp_path / "PWNED"

    class Plant:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "deepspeed"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3, "param_groups": [{"lr": 0.1}]}, folder / "mp_rank_00_model_states.pt")
    assert pickle_globals(folder / "mp_rank_00_model_states.pt") <= {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
    }
    refuse_foreign_pickles(folder, frozenset())
    for name, payload in (("zip.pt", None), ("plain.pt", pickle.dumps(Plant())), ("junk.pt", b"\x80\x04not a pickle")):
        if payload is None:
            torch.save({"x": Plant()}, folder / name)
        else:
            (folder / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=name):
            refuse_foreign_pickles(folder, frozenset())
        (folder / name).unlink()
    assert not marker.exists()
