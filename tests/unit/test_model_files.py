"""A model directory is checked at `launcher plan` from its headers only (issue 27): config.json's own
rules, the tokenizer files, every safetensors header, and the declared shapes against config.json
and the tokenizer. Each broken copy of the tiny model is one `error: model.name_or_path:` line naming
the file, exit 2, no traceback; an intact copy (one file or sharded) still plans."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _archs import tiny_arch
from _support import launcher_cli

from launcher.cli import main
from launcher.config.arch import read_architecture
from launcher.config.modelfiles import file_problems, read_header
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_tiny_model()


@pytest.fixture
def model(tiny: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny model directory, to break."""
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    return copy


def split_file(file: Path) -> tuple[dict[str, Any], bytes]:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_file(file: Path, header: dict[str, Any], body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)


def edit_header(file: Path, change: Callable[[dict[str, Any]], None]) -> None:
    header, body = split_file(file)
    change(header)
    write_file(file, header, body)


def edit_json(file: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def plan(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["plan", TINY, f"model.name_or_path={model}", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _bad_header_length(model: Path) -> None:
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(data)) + data[8:])


def _huge_header_length(model: Path) -> None:
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _header_not_json(model: Path) -> None:
    data = bytearray((model / WEIGHTS).read_bytes())
    data[8:16] = b"\xff{not js"
    (model / WEIGHTS).write_bytes(bytes(data))


def _truncated(model: Path) -> None:
    with open(model / WEIGHTS, "r+b") as handle:
        handle.truncate((model / WEIGHTS).stat().st_size - 1000)


def _trailing_bytes(model: Path) -> None:
    with open(model / WEIGHTS, "ab") as handle:
        handle.write(b"\0" * 8)


def _wrong_byte_count(header: dict[str, Any]) -> None:
    header["model.norm.weight"]["shape"] = [127]  # 508 bytes of F32 in a 512-byte slot


def _wrong_q_shape(header: dict[str, Any]) -> None:
    header["model.layers.1.self_attn.q_proj.weight"]["shape"] = [64, 256]  # as many bytes, the wrong dims


def _missing_shard(model: Path) -> None:
    header, _ = split_file(model / WEIGHTS)
    names = [k for k in header if k != "__metadata__"]
    weight_map = {k: WEIGHTS if i % 2 else "model-00002-of-00002.safetensors" for i, k in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _more_tokens_than_rows(data: dict[str, Any]) -> None:
    data["added_tokens"].append({"id": 2047, "content": "<|extra|>", "special": True})


def _fifo(model: Path) -> None:
    (model / WEIGHTS).unlink()
    os.mkfifo(model / WEIGHTS)


# (id, how to break the copy, text the error names besides the file, the file named)
BROKEN: list[tuple[str, Callable[[Path], None], str, str]] = [
    (
        "unknown-model-type",
        lambda m: edit_json(m / "config.json", lambda c: c.update(model_type="llama9")),
        "model_type 'llama9'",
        "config.json",
    ),
    (
        "hidden-not-multiple-of-heads",
        lambda m: edit_json(m / "config.json", lambda c: c.update(num_attention_heads=3, num_key_value_heads=3)),
        "hidden_size 128 is not a multiple of num_attention_heads 3",
        "config.json",
    ),
    ("head-dim-zero", lambda m: edit_json(m / "config.json", lambda c: c.update(head_dim=0)), "head_dim 0 is not positive", "config.json"),
    ("no-tokenizer", lambda m: (m / "tokenizer.json").unlink(), "has weights but no tokenizer files", str(Path("model"))),
    ("tokenizer-not-json", lambda m: (m / "tokenizer.json").write_text('{"model": '), "is not JSON", "tokenizer.json"),
    ("tokenizer-config-not-json", lambda m: (m / "tokenizer_config.json").write_text("nope"), "is not JSON", "tokenizer_config.json"),
    ("header-not-json", _header_not_json, "its header is not JSON", WEIGHTS),
    ("header-length-beyond-file", _bad_header_length, "but only 4006424 bytes follow its length", WEIGHTS),
    ("header-length-over-limit", _huge_header_length, "more than safetensors' 100000000", WEIGHTS),
    ("truncated", _truncated, "data_offsets [", WEIGHTS),
    ("trailing-bytes", _trailing_bytes, "the file holds", WEIGHTS),
    (
        "dtype-x-shape",
        lambda m: edit_header(m / WEIGHTS, _wrong_byte_count),
        "F32 [127] (508 bytes) but its data_offsets hold 512",
        WEIGHTS,
    ),
    ("fifo", _fifo, "is not a regular file", WEIGHTS),
    ("index-names-missing-shard", _missing_shard, "names shard model-00002-of-00002.safetensors, which is missing", "index.json"),
    ("q-proj-shape", lambda m: edit_header(m / WEIGHTS, _wrong_q_shape), "q_proj.weight has shape [64, 256]", WEIGHTS),
    (  # a checkpoint of another architecture under this config.json (issue 25: it failed in the ranks)
        "another-models-weights",
        lambda m: shutil.copy2(tiny_arch("gpt2") / WEIGHTS, m / WEIGHTS),
        "have no model.layers.0.self_attn.q_proj.weight, which a llama model",
        "model",
    ),
    (
        "embedding-smaller-than-tokenizer",
        lambda m: edit_json(m / "tokenizer.json", _more_tokens_than_rows),
        "has 2048 tokens, but the model's embedding has 1024 rows",
        "tokenizer.json",
    ),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("name", "corrupt", "text", "file"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_model_dir_is_refused_at_plan(
    name: str, corrupt: Callable[[Path], None], text: str, file: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt(model)
    code, output = plan(model, tmp_path, capsys)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert all(line.startswith("error: ") and ";" in line for line in lines), output
    assert any(line.startswith("error: model.name_or_path: ") and text in line and file in line for line in lines), output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["header-not-json", "fifo", "unknown-model-type"])
def test_as_a_user_runs_it(name: str, model: Path, tmp_path: Path) -> None:
    """`python -m launcher plan`: the exit status and the one line a shell sees."""
    _, corrupt, text, _ = next(b for b in BROKEN if b[0] == name)
    corrupt(model)
    done = launcher_cli("plan", TINY, f"model.name_or_path={model}", "--out", str(tmp_path / "run"), check=False, timeout=50)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: model.name_or_path: ") and text in done.stderr


def test_intact_and_sharded_copies_plan(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan(model, tmp_path, capsys)[0] == 0
    header, body = split_file(model / WEIGHTS)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    shards: dict[str, str] = {}
    for part, chosen in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"model-{part:05d}-of-00002.safetensors"
        start = header[chosen[0]]["data_offsets"][0]
        moved = {k: {**header[k], "data_offsets": [o - start for o in header[k]["data_offsets"]]} for k in chosen}
        write_file(model / shard, {"__metadata__": {"format": "pt"}, **moved}, body[start : header[chosen[-1]]["data_offsets"][1]])
        shards.update(dict.fromkeys(chosen, shard))
    (model / WEIGHTS).unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    assert file_problems(model, read_architecture(model / "config.json")) == []
    assert plan(model, tmp_path / "sharded", capsys)[0] == 0


def test_config_only_dir_still_plans_and_a_header_is_read_alone(tiny: Path, tmp_path: Path) -> None:
    """config.json alone (the shapes for an estimate) is the run's to refuse; a header read is bounded
    by its declared length, so the tensors declared are exactly the file's."""
    (tmp_path / "m").mkdir()
    shutil.copy(tiny / "config.json", tmp_path / "m" / "config.json")
    assert file_problems(tmp_path / "m", read_architecture(tmp_path / "m" / "config.json")) == []
    header = read_header(tiny / WEIGHTS)
    assert header["model.embed_tokens.weight"] == ("F32", [1024, 128]) and len(header) == 2 + 4 * 9 + 1


def test_a_snapshot_fetched_by_the_run_is_checked_the_same_way(model: Path) -> None:
    """A Hub id fetched at run time (after the plan) gets the same checks before any rank loads it."""
    from launcher.runtime.model.files import ModelError, checked

    assert checked(model) == model
    _header_not_json(model)
    with pytest.raises(ModelError, match=r"^model\.name_or_path: .*model\.safetensors: its header is not JSON"):
        checked(model)
