"""Bad input: one line per mistake naming the exact key, exit code 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main
from launcher.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")

# (overrides on tiny-cpu.yaml, the key the error must name)
MALFORMED: list[tuple[list[str], str]] = [
    (["train.max_stepz=10"], "train.max_stepz"),
    (["trian.max_steps=10"], "trian"),
    (["parallel.fsdp.reshard=true"], "parallel.fsdp.reshard"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["train.max_steps=2.5"], "train.max_steps"),
    (["train.max_steps=0"], "train.max_steps"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=2"], "optim.lr"),
    (["optim.beta2=1.0"], "optim.beta2"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.warmup_steps=500"], "optim.warmup_steps"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
    (["optim.scheduler=exponential"], "optim.scheduler"),
    (["train.precision=fp8"], "train.precision"),
    (["train.precision=fp16"], "train.precision"),
    (["train.global_batch_size=10"], "train.global_batch_size"),
    (["train.global_batch_size=24", "train.gradient_accumulation_steps=2"], "train.global_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["parallel.backend=megatron"], "parallel.backend"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage"),
    (["parallel.zero_stage=2"], "parallel.zero_stage"),
    (["parallel.offload_optimizer=cpu"], "parallel.offload_optimizer"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=cpu"], "parallel.offload_params"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=0", "parallel.offload_optimizer=cpu"], "parallel.offload_optimizer"),
    (["parallel.backend=deepspeed", "parallel.offload_params=nvme"], "parallel.nvme_path"),
    (["parallel.backend=deepspeed", "parallel.fsdp.hsdp=true"], "parallel.fsdp.hsdp"),
    (["parallel.fsdp.hsdp=true"], "parallel.fsdp.hsdp"),
    (["parallel.fsdp.cpu_offload=true"], "parallel.fsdp.cpu_offload"),
    (["parallel.backend=single"], "parallel.backend"),
    (["cluster.world_size=4"], "cluster.world_size"),
    (["cluster.nodes=0"], "cluster.nodes"),
    (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node"),
    (["cluster.accelerator=tpu"], "cluster.accelerator"),
    (["cluster.time=forever"], "cluster.time"),
    (["cluster.time=00:01:00", "cluster.signal_seconds=120"], "cluster.signal_seconds"),
    (["cluster.partition=gpu;rm -rf /"], "cluster.partition"),
    (["cluster.mem=lots"], "cluster.mem"),
    (["cluster.extra_sbatch=[--exclusive; echo hi]"], "cluster.extra_sbatch"),
    (["cluster.extra_sbatch=--exclusive"], "cluster.extra_sbatch"),
    (["cluster.env={'1BAD': x}"], "cluster.env.1BAD"),
    (["cluster.rdzv_port=80"], "cluster.rdzv_port"),
    (["run.name=my run"], "run.name"),
    (["run.name="], "run.name"),
    (["run.output_dir=/tmp/a%jb"], "run.output_dir"),
    (["method.name=dpo"], "method.name"),
    (["method.lora.r=0"], "method.lora.r"),
    (["method.lora.dropout=1.0"], "method.lora.dropout"),
    (["method.lora.target_modules=[]"], "method.lora.target_modules"),
    (["method.name=qlora", "method.quant.quant_storage_dtype=float32", "model.dtype=bfloat16"], "method.quant.quant_storage_dtype"),
    (["method.name=qlora", "model.dtype=float32"], "method.quant.quant_storage_dtype"),
    (["method.quant.quant_type=int3"], "method.quant.quant_type"),
    (["method.name=freeze", "method.freeze.trainable_last_layers=9"], "method.freeze.trainable_last_layers"),
    (["method.name=prompt_tuning"], "data.packing"),
    (["model.trust_remote_code=true"], "data.packing"),
    (["kernels.attention=flash"], "kernels.attention"),
    (["model.name_or_path=./no/such/model"], "model.name_or_path"),
    (["model.name_or_path=org/hub-model"], "model.hidden_size"),
    (["model.hidden_size=0"], "model.hidden_size"),
    (["data.path=/no/such/file.jsonl"], "data.path"),
    (["data.path=missing.jsonl"], "data.path"),
    (["data.template=alpacha"], "data.template"),
    (["data.max_seq_len=8"], "data.max_seq_len"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["data.template=text"], "train.eval_exact_match"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["checkpoint.resume="], "checkpoint.resume"),
    (["train=5"], "train"),
]


def test_table_is_large_enough() -> None:
    assert len(MALFORMED) >= 40


@pytest.mark.parametrize(("overrides", "key"), MALFORMED, ids=[" ".join(o) for o, _ in MALFORMED])
def test_malformed_recipe_names_key_and_writes_nothing(
    overrides: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, *overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert any(line.startswith(f"error: {key}: ") for line in lines), err
    assert all(";" in line for line in lines), "every error line says how to fix it"
    assert not out.exists()


def test_every_mistake_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.max_stepz=1", "optim.lr=fast", "parallel.zero_stage=2", "train.global_batch_size=10"])
    assert err.value.keys == ["train.max_stepz", "optim.lr", "train.global_batch_size", "parallel.zero_stage"]


def test_existing_run_dir_is_not_overwritten_on_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["plan", TINY, "train.max_steps=-1", "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_cli_error_is_clean_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    for argv in (["validate", str(bad)], ["plan", TINY, "parallel.zero_stage=9"], ["validate", str(tmp_path / "none.yaml")]):
        done = subprocess.run([sys.executable, "-m", "launcher", *argv], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr


KEYS = [
    "train.max_steps",
    "train.micro_batch_size",
    "train.global_batch_size",
    "train.gradient_accumulation_steps",
    "train.precision",
    "optim.lr",
    "optim.warmup_steps",
    "parallel.backend",
    "parallel.zero_stage",
    "parallel.offload_optimizer",
    "parallel.fsdp.hsdp",
    "cluster.nodes",
    "cluster.gpus_per_node",
    "cluster.time",
    "cluster.env",
    "cluster.extra_sbatch",
    "method.name",
    "method.lora.r",
    "method.quant.quant_storage_dtype",
    "model.name_or_path",
    "model.dtype",
    "data.path",
    "data.packing",
    "run.name",
    "run.output_dir",
    "checkpoint.every",
    "no.such.key",
]
VALUES = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["deepspeed", "fsdp", "ddp", "single", "qlora", "lora", "bf16", "fp16", "cpu", "null", "[1, 2]", "{a: 1}"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_random_overrides_give_clean_errors_only(pairs: list[tuple[str, object]]) -> None:
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        load_config(TINY, overrides)
    except ConfigError as exc:
        assert exc.problems and all(line.startswith("error: ") for line in str(exc).splitlines())


def _fake_checkpoint(run: Path, step: int, **manifest: object) -> Path:
    """A complete-looking checkpoint folder (manifest + COMPLETE, no tensors): enough for the
    torch-free resume checks `plan` makes."""
    import json

    folder = run / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": {}, **manifest}))
    (folder / "COMPLETE").write_text("")
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changed_settings_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, "--out", str(out)]) == 0
    _fake_checkpoint(out, 5, global_batch_size=16, seed=1234, max_seq_len=256, method="full", backend="fsdp")
    before = _tree(out)
    capsys.readouterr()
    assert main(["plan", TINY, "train.global_batch_size=8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint.resume: ") and "global_batch_size: 16 -> 8" in err, err
    assert _tree(out) == before, "plan.json and config.yaml of the earlier run are untouched"
    # Each piece of advice in the error is accepted by the tool.
    assert "checkpoint.allow_mismatch=true" in err and "--out DIR" in err and "resume=never" not in err
    assert main(["plan", TINY, "train.global_batch_size=8", "checkpoint.allow_mismatch=true", "--out", str(out)]) == 0
    assert main(["plan", TINY, "train.global_batch_size=8", "--out", str(tmp_path / "fresh")]) == 0


def test_no_complete_checkpoint_and_never_on_top_are_refused_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, "--out", str(out)]) == 0
    (_fake_checkpoint(out, 5) / "COMPLETE").unlink()
    before = _tree(out)
    capsys.readouterr()
    assert main(["plan", TINY, "--out", str(out)]) == 2
    assert "none of the 1 checkpoint folder(s)" in capsys.readouterr().err
    assert main(["plan", TINY, "checkpoint.resume=never", "--out", str(out)]) == 2
    assert "holds an earlier run's checkpoints" in capsys.readouterr().err
    assert _tree(out) == before


def test_run_dir_held_by_another_process_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from launcher.runlock import acquire; acquire({str(out)!r}); print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _tree(out)
        assert main(["plan", TINY, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: another run owns this directory (pid {holder.pid} on {socket.gethostname()})"), err
        assert _tree(out) == before
    finally:
        holder.kill()
        holder.wait()  # dead: the kernel has dropped its lock
    assert main(["plan", TINY, "--out", str(out)]) == 0, "the lock died with its process"


def test_private_artifacts_and_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o027)
    try:
        assert main(["plan", TINY, "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes["plan.json"] == modes["config.yaml"] == 0o600 and modes["launch.sh"] == modes["job.sbatch"] == 0o700
    assert modes["estimate.txt"] == 0o640 and modes["fsdp.json"] == 0o640, modes


def test_next_hint_repeats_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "my run"
    assert main(["plan", "tiny-cpu.yaml", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"next: launcher run tiny-cpu.yaml --out '{out}'" in printed
    assert f"launcher submit tiny-cpu.yaml --out '{out}'" in printed


def test_base_lookup_is_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`base: tiny-cpu.yaml` in a user's recipe finds the shipped one, as the recipe argument does."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "r.yaml").write_text("base: tiny-cpu.yaml\ntrain:\n  max_steps: 70\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(user / "r.yaml").train.max_steps == 70
    (user / "tiny-cpu.yaml").write_text("base: ../../../recipes/nothing.yaml\n")  # a file beside it wins
    with pytest.raises(ConfigError, match="looked in"):
        load_config(user / "r.yaml")


def test_export_errors_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["plan", TINY, "--out", str(out)]) == 0
    _fake_checkpoint(out, 10)
    capsys.readouterr()
    assert main(["export", str(out), "--step", "15", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("error: --step 15: ") and not (tmp_path / "e").exists()
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "e")]) == 2
    assert "--merge" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_changed_data_refused_before_run_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run`/`prepare` build the data cache first: a changed data set is refused before the earlier
    run's files are touched (the fingerprint is the cache folder's name)."""
    out = tmp_path / "run"
    assert main(["plan", TINY, "--out", str(out)]) == 0
    settings = {"global_batch_size": 16, "seed": 1234, "max_seq_len": 256, "method": "full", "backend": "fsdp"}
    _fake_checkpoint(out, 5, data_fingerprint="an-older-data-set", **settings)
    before = _tree(out)
    capsys.readouterr()
    assert main(["prepare", TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint.resume: ") and "data_fingerprint: 'an-older-data-set' -> " in err, err
    assert _tree(out) == before


def test_changed_max_steps_is_announced_with_the_way_back() -> None:
    from launcher.plan.resume import schedule_note

    cfg = load_config(TINY, ["train.max_steps=300"])
    note = schedule_note({"step": 100, "max_steps": 200}, cfg)
    assert note is not None and "200 -> 300" in note and "rate jumps at step 100" in note
    assert "train.max_steps=200" in note, "offers to keep the old schedule"
    assert schedule_note({"step": 100, "max_steps": 300}, cfg) is None
    assert schedule_note({"step": 100}, cfg) is None  # an older manifest: nothing to compare


def test_a_control_character_in_a_recipe_or_a_bad_byte_in_an_override_is_one_line(tmp_path: Path, capsys) -> None:
    """YAML's reader refuses them before parsing: that was a yaml.reader.ReaderError traceback (issue 27)."""
    from launcher.cli import main

    recipe = tmp_path / "ctl.yaml"
    recipe.write_bytes(b'run:\n  name: "a\x01b"\n')
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: contains U+0001 at character 15, which YAML does not allow") and "Traceback" not in err
    undecodable = b"run.name=a\xffb".decode("utf-8", "surrogateescape")  # what argv holds for a byte that is not UTF-8
    assert main(["validate", "tiny-cpu.yaml", undecodable]) == 2
    assert capsys.readouterr().err.startswith("error: run.name: contains U+DCFF at character 1")
