"""Cleaning, templates, prompt masking, packing and the world-size-independent sample order."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.config import load_config
from launcher.runtime.data import IGNORE_INDEX, CleanReport, DataError, clean, load_records, tokenize
from launcher.runtime.data.packing import GlobalOrder, TokenData, pack_lengths, prepare_data
from launcher.runtime.data.sources import INVALID
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _data(**overrides):
    extra = ["train.eval_exact_match=0"] if overrides.get("template") == "text" else []
    return load_config(ROOT / "recipes" / "tiny-cpu.yaml", [f"data.{k}={v}" for k, v in overrides.items()] + extra).data


def test_clean_dedups_normalises_and_drops_empty() -> None:
    records = [
        {"prompt": "café", "response": "x"},
        {"prompt": "cafe\u0301", "response": "x"},  # the same text, decomposed: a duplicate after NFC
        {"prompt": "  ", "response": "y"},
        {"prompt": "p", "response": ""},
        {"prompt": "p", "response": "z"},
    ]
    report = CleanReport()
    kept = clean(records, _data(), report)
    assert kept == [{"prompt": "café", "response": "x"}, {"prompt": "p", "response": "z"}]
    assert (report.read, report.duplicates, report.empty) == (5, 1, 2)
    assert len(clean(records, _data(dedup="false"), CleanReport())) == 3


def test_missing_field_names_the_key() -> None:
    with pytest.raises(DataError, match="prompt_field"):
        clean([{"question": "a", "response": "b"}], _data(), CleanReport())


def test_instruction_template_masks_the_prompt(tokenizer) -> None:
    example = tokenize({"prompt": "add: 2 + 3", "response": "5"}, _data(), tokenizer)
    answer = tokenizer.encode("5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert example.input_ids[-len(answer) :] == answer
    assert example.labels[-len(answer) :] == answer
    assert set(example.labels[: -len(answer)]) == {IGNORE_INDEX}
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert (
        tokenizer.decode(example.input_ids[: -len(answer)], skip_special_tokens=True) == "### Instruction:\nadd: 2 + 3\n\n### Response:\n"
    )
    full = tokenize({"prompt": "add: 2 + 3", "response": "5"}, _data(train_on_prompt="true"), tokenizer)
    assert full.labels == full.input_ids


def test_chat_template_trains_only_assistant_turns(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "copy: cat"},
        {"role": "assistant", "content": "cat"},
        {"role": "user", "content": "copy: dog"},
        {"role": "assistant", "content": "dog"},
    ]
    example = tokenize({"messages": messages}, _data(template="chat"), tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example.input_ids == list(full)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained == "cat<|end|>\ndog<|end|>\n"


def test_text_template_trains_on_everything(tokenizer) -> None:
    example = tokenize({"text": "cat dog"}, _data(template="text"), tokenizer)
    assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id


def test_pack_fills_rows_without_splitting_documents() -> None:
    sizes = np.asarray([7, 3, 5, 5, 2, 8, 1])
    row_of = pack_lengths(sizes, capacity=10)
    assert row_of.shape == sizes.shape  # every document placed once, whole
    assert np.bincount(row_of, weights=sizes).max() <= 10
    assert row_of.max() + 1 == 4  # 31 tokens need at least 4 rows of 10
    assert row_of.tolist() == [0, 0, 1, 1, 2, 2, 3]  # best fit: the 8 fills the row the 2 opened


def test_global_order_does_not_depend_on_world_size() -> None:
    order = GlobalOrder(rows=50, seed=3)

    def rows_of_step(step: int, world: int, micro: int, accum: int) -> list[int]:
        out = []
        for rank in range(world):
            for micro_rows in order.step_rows(step, 16, rank, world, micro, accum):
                out += micro_rows
        return out

    for step in (0, 3, 7):  # step 3 crosses an epoch boundary (48..63 of 50 rows)
        one = rows_of_step(step, 1, 4, 4)
        assert one == rows_of_step(step, 2, 4, 2) == rows_of_step(step, 4, 2, 2) == rows_of_step(step, 8, 1, 2)
        assert one == [order.row(step * 16 + i) for i in range(16)]
    epoch0 = [order.row(i) for i in range(50)]
    assert sorted(epoch0) == list(range(50))


def test_prepared_cache_is_reused_and_keyed(tmp_path: Path, tiny_dir: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"copy: w{i}", "response": f"w{i}"}) + "\n" for i in range(40)))
    data = _data(path=str(source), val_fraction=0.1)
    first = prepare_data(data, str(source), tiny_dir, tmp_path / "cache", seed=1)
    assert prepare_data(data, str(source), tiny_dir, tmp_path / "cache", seed=1) == first
    meta = json.loads((first / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 40 and meta["val"]["documents"] == 4
    source.write_text(source.read_text().replace("w1", "v1"))  # same size, new content: a new key
    assert prepare_data(data, str(source), tiny_dir, tmp_path / "cache", seed=1) != first
    train = TokenData(first, "train")
    batch = train.batch([0, -1])
    assert batch.input_ids.shape[0] == 2 and (batch.labels[1] == IGNORE_INDEX).all()
    assert batch.label_tokens == int(np.sum(batch.labels != IGNORE_INDEX))


def test_cache_is_keyed_on_the_tokenizer_not_its_folder(tmp_path: Path, tiny_dir: Path) -> None:
    """The same tokenizer in two folders prepares once; a changed tokenizer file, or a model_type that
    makes AutoTokenizer pick another class, is another tokenizer; the rest of config.json is not."""
    import shutil

    from launcher.runtime.data.packing import cache_key

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"copy: w{i}", "response": f"w{i}"}) + "\n" for i in range(40)))
    data = _data(path=str(source), val_fraction=0.1)
    folders = {}
    for name in ("a", "b"):
        folders[name] = tmp_path / name / "model"
        folders[name].mkdir(parents=True)
        for file in tiny_dir.iterdir():
            if file.name != "model.safetensors":
                shutil.copy(file, folders[name])
    first = prepare_data(data, str(source), folders["a"], tmp_path / "cache", seed=1)
    assert prepare_data(data, str(source), folders["b"], tmp_path / "cache", seed=1) == first
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [first.name], "built once"

    def key(folder: Path) -> str:
        return cache_key(data, str(source), folder, seed=1)

    b = folders["b"]
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    assert key(b) == first.name  # the model's shape leaves the tokens alone
    (b / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert key(b) != first.name
    (b / "config.json").write_text(json.dumps(config))
    assert key(b) == first.name
    tokenizer_config = (b / "tokenizer_config.json").read_text()
    (b / "tokenizer_config.json").write_text(json.dumps({**json.loads(tokenizer_config), "pad_token": "</s>"}))
    assert key(b) != first.name
    (b / "tokenizer_config.json").write_text(tokenizer_config)
    assert key(b) == first.name
    (b / "special_tokens_map.json").write_text('{"pad_token": "</s>"}')  # read by AutoTokenizer too
    assert key(b) != first.name


def test_corrupt_file_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    # a line that is not JSON is one row the pipeline counts as invalid (then drops, or refuses past
    # data.max_dropped_fraction), named by its line
    records = load_records(str(bad), "auto", "train", cache_dir=str(tmp_path / "work"))
    assert [r.get(INVALID) for r in records] == [None, "line 2 is not JSON (Expecting property name enclosed in double quotes)"]
    (tmp_path / "bad.json").write_text('[{"prompt": "a"},\n{not json]\n')
    with pytest.raises(DataError, match=r"bad\.json: cannot be read as json \("):
        load_records(str(tmp_path / "bad.json"), "auto", "train", cache_dir=str(tmp_path / "work"))


def test_launcher_run_with_corrupt_data_fails_before_launch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / "tiny-cpu.yaml"), f"data.path={bad}", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "metrics.jsonl").exists() and "process(es)" not in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "launcher", "run", "tiny-cpu.yaml", "data.path=/no/such.jsonl", "--out", str(tmp_path / "r2")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: data.path: /no/such.jsonl does not exist")
    assert not (tmp_path / "r2").exists()


def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"someorg/somedata: not a local file and the Hub is off .*download it first"):
        load_records("someorg/somedata", "auto", "train")


def test_every_local_format_reads_the_same_records(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"copy: w{i}", "response": f"w{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "saved"):
        assert load_records(str(tmp_path / name), "auto", "train") == rows, name
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_records(str(tmp_path / "d.txt"), "auto", "train")


def test_prepare_prints_the_cleaning_report_and_writes_it(tmp_path: Path) -> None:
    source = tmp_path / "d.jsonl"
    rows = [{"instruction": f"copy: w{i % 35}", "input": "", "output": f"w{i % 35}"} for i in range(40)]  # 5 repeats
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["tiny-cpu.yaml", f"data.path={source}", "data.template=alpaca", f"data.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "launcher", "prepare", *common, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "data: d.jsonl: read 40, dropped 0 empty, 5 duplicate, 0 over-long" in done.stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["sources"][0]["duplicates"] == 5 and report["train"]["documents"] == report["sources"][0]["kept"]
    bad = subprocess.run(
        [sys.executable, "-m", "launcher", "prepare", *common, "data.max_seq_len=16", "--out", str(tmp_path / "r2")],
        capture_output=True,
        text=True,
    )
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert re.match(
        r"error: d\.jsonl: \d+ of 40 rows dropped \(\d+%: 5 duplicate, \d+ over-long\), more than data\.max_dropped_fraction=0\.5; raise",
        lines[0],
    )


def test_num_proc_gives_the_same_cache(tmp_path: Path, tiny_dir: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"copy: w{i}", "response": f"w{i}"}) + "\n" for i in range(200)))
    one, two = (prepare_data(_data(path=str(source), num_proc=n), str(source), tiny_dir, tmp_path / f"cache{n}", seed=1) for n in (1, 2))
    assert one.name == two.name  # num_proc is not part of the data fingerprint
    for split in ("train", "val"):
        for name in ("input_ids", "target_mask", "offsets", "label_tokens", "doc_lengths"):
            assert np.array_equal(np.load(one / split / f"{name}.npy"), np.load(two / split / f"{name}.npy")), (split, name)
