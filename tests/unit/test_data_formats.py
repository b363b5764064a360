"""Data as users have it, table-driven: alpaca with and without input, ShareGPT, OpenAI messages with
a system turn, plain text and a classification table, each prepared through the real pipeline and
checked token by token against the tokenizer (prompt masking against its own apply_chat_template)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launcher.config import load_config
from launcher.runtime.data import IGNORE_INDEX, DataError, alpaca_prompt
from launcher.runtime.data.packing import TokenData, prepare_data
from launcher.runtime.model.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = [{"role": "system", "content": "answer in one word"}]
CHAT = [
    {"role": "user", "content": "copy: cat"},
    {"role": "assistant", "content": "cat"},
    {"role": "user", "content": "copy: dog"},
    {"role": "assistant", "content": "dog"},
]
SHAREGPT = [{"from": "system", "value": "answer in one word"}, {"from": "human", "value": "copy: cat"}, {"from": "gpt", "value": "cat"}]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _data(*overrides: str) -> Any:
    return load_config(
        ROOT / "recipes" / "tiny-cpu.yaml", ["data.packing=false", "data.val_fraction=0", "train.eval_exact_match=0", *overrides]
    ).data


def _prepare(
    tmp_path: Path, rows: list[dict[str, Any]], tiny_dir: Path, *overrides: str, task: str = "causal_lm", name: str = "d.jsonl"
) -> Path:
    source = tmp_path / name
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _data(f"data.path={source}", *overrides)
    return prepare_data(data, str(source), tiny_dir, tmp_path / "cache", seed=1, task=task)


def _only_row(folder: Path) -> tuple[list[int], list[int]]:
    train = TokenData(folder, "train")
    assert len(train) == 1
    return [int(t) for t in train.input_ids], [int(t) for t in train.labels]


def _chat_reference(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The tokenizer's own rendering; a token is trained when it is added by an assistant turn."""

    def ids(msgs: list[dict[str, str]], gen: bool = False) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)["input_ids"]) if msgs else []

    full = ids(messages)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(ids(messages[:i], gen=True)), len(ids(messages[: i + 1]))
            labels[start:end] = full[start:end]
    return full, labels


def _prompt_answer(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    head = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    tail = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


CASES = [
    ("alpaca with input", [{"instruction": "copy the word", "input": "cat", "output": "cat"}], ["data.template=alpaca"]),
    ("alpaca without input", [{"instruction": "say cat", "output": "cat"}], ["data.template=alpaca"]),
    ("alpaca, empty input", [{"instruction": "say cat", "input": "", "output": "cat"}], ["data.template=alpaca"]),
    ("sharegpt", [{"conversations": SHAREGPT}], ["data.template=chat"]),
    ("openai with system", [{"messages": SYSTEM + CHAT}], ["data.template=chat"]),
    ("plain text", [{"body": "cat dog fox"}], ["data.template=text", "data.columns={text: body}"]),
]


@pytest.mark.parametrize(("case", "rows", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_format_masks_exactly_the_prompt(
    case: str, rows: list[dict[str, Any]], overrides: list[str], tmp_path: Path, tiny_dir: Path, tokenizer: Any
) -> None:
    ids, labels = _only_row(_prepare(tmp_path, rows, tiny_dir, *overrides))
    row = rows[0]
    if case.startswith("alpaca"):
        expected = _prompt_answer(tokenizer, alpaca_prompt(row["instruction"], row.get("input", "")), row["output"])
        assert ("### Input:" in tokenizer.decode(ids)) == bool(row.get("input"))
    elif case == "sharegpt":
        converted = [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]} for t in row["conversations"]
        ]
        expected = _chat_reference(tokenizer, converted)
    elif case == "openai with system":
        expected = _chat_reference(tokenizer, row["messages"])
        assert tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]) == "cat<|end|>\ndog<|end|>\n"
    else:
        full = [tokenizer.bos_token_id] + tokenizer.encode(row["body"], add_special_tokens=False) + [tokenizer.eos_token_id]
        expected = (full, full)
    assert (ids, labels) == expected, case


def test_classification_table(tmp_path: Path, tiny_dir: Path) -> None:
    import datasets

    rows = [{"sentence": f"w{i} is {'good' if i % 3 else 'bad'}", "stars": 1 + (i % 3 > 0)} for i in range(12)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "t.csv"), index=False)
    data = _data(f"data.path={tmp_path / 't.csv'}", "data.columns={text: sentence, label: stars}", "task=classification")
    folder = prepare_data(data, str(tmp_path / "t.csv"), tiny_dir, tmp_path / "cache", seed=1, task="classification")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["labels"] == ["1", "2"]
    train = TokenData(folder, "train")
    assert len(train) == 12 and sorted(np.asarray(train.classes).tolist()) == [0] * 4 + [1] * 8
    assert np.asarray(train.label_tokens).tolist() == [1] * 12 and (np.asarray(train.labels) == IGNORE_INDEX).all()


def test_alpaca_dedup_keeps_rows_that_differ_in_input(tmp_path: Path, tiny_dir: Path) -> None:
    rows = [{"instruction": "copy the word", "input": f"w{i}", "output": f"w{i}"} for i in range(30)] * 2
    folder = _prepare(tmp_path, rows, tiny_dir, "data.template=alpaca")
    (report,) = json.loads((folder / "meta.json").read_text())["sources"]
    assert (report["read"], report["duplicates"], report["kept"]) == (60, 30, 30)


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            ["data.template=chat"],
            r"1 of 1 rows dropped \(100%: 1 invalid\).*\(row 1: unknown role 'bot'; use system, user or assistant",
        ),
        (
            [{"instruction": "a", "output": "b"}],
            ["data.template=alpaca", "data.columns={input: context}"],
            r"row 1 has no column 'context'",
        ),
        ([{"question": "a", "response": "b"}], [], r"no column 'prompt'.*data\.prompt_field.*question"),
    ],
)
def test_bad_rows_are_one_line_errors(
    rows: list[dict[str, Any]], overrides: list[str], message: str, tmp_path: Path, tiny_dir: Path
) -> None:
    with pytest.raises(DataError, match=message) as caught:
        _prepare(tmp_path, rows, tiny_dir, *overrides)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "cache").glob("*/COMPLETE"))  # nothing written


def test_chat_template_override_and_missing_template(tmp_path: Path, tiny_dir: Path, tokenizer: Any) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for jinja in bare.glob("*.jinja"):
        jinja.unlink()
    rows = [{"messages": CHAT}]
    with pytest.raises(DataError, match=r"^data\.chat_template: the tokenizer in .* has no chat template; set data\.chat_template"):
        _prepare(tmp_path, rows, bare, "data.template=chat")
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    (tmp_path / "chat.jinja").write_text(template.replace("<|end|>\n", "<|end|>"))  # a file may hold newlines
    inline = template.replace("\n", "{{ '\\n' }}")  # a recipe string may not: Jinja's escape renders one
    for setting, renders in ((inline, template), (str(tmp_path / "chat.jinja"), template.replace("<|end|>\n", "<|end|>"))):
        ids, labels = _only_row(_prepare(tmp_path, rows, bare, "data.template=chat", f"data.chat_template={json.dumps(setting)}"))
        rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, chat_template=renders)
        assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]).startswith("cat<|end|>")


def test_val_split_of_a_dataset_dict_never_holds_training_rows(tmp_path: Path, tiny_dir: Path) -> None:
    import datasets

    train = [{"prompt": f"copy: w{i}", "response": f"w{i}"} for i in range(40)]
    val = [{"prompt": f"copy: v{i}", "response": f"v{i}"} for i in range(8)] + train[:2]  # two leaked rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(val)}).save_to_disk(
        str(tmp_path / "dd")
    )
    path = str(tmp_path / "dd")
    folder = prepare_data(_data(f"data.path={path}", "data.val_split=validation"), path, tiny_dir, tmp_path / "cache", seed=1)
    meta = json.loads((folder / "meta.json").read_text())
    (report,), (val_report,) = meta["sources"], meta["val_sources"]
    assert (report["read"], report["kept"], val_report["read"], val_report["val"], val_report["val_overlap"]) == (40, 40, 10, 8, 2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)

    def documents(split: str) -> set[str]:
        data = TokenData(folder, split)
        return {tok.decode(data.batch([r]).input_ids[0][: int(data.batch([r]).lengths[0])]) for r in range(len(data))}

    train_docs, val_docs = documents("train"), documents("val")
    assert not train_docs & val_docs
    assert all("copy: v" in d for d in val_docs) and len(val_docs) == 8
    with pytest.raises(DataError, match=r"has no split 'valid' \(data.val_split\); its splits are train, validation"):
        prepare_data(_data(f"data.path={path}", "data.val_split=valid"), path, tiny_dir, tmp_path / "cache", seed=1)
    with pytest.raises(DataError, match=r"data\.val_path: .* has the splits train, validation; set data\.val_split"):
        prepare_data(_data(f"data.path={path}", f"data.val_path={path}"), path, tiny_dir, tmp_path / "cache", seed=1)


def test_too_many_dropped_rows_is_an_error_that_says_why(tmp_path: Path, tiny_dir: Path) -> None:
    rows = [{"prompt": f"say {5 + i} cats", "response": " ".join(["cat"] * (5 + i))} for i in range(20)]
    with pytest.raises(
        DataError,
        match=r"d\.jsonl: (\d+) of 20 rows dropped \(\d+%: \1 over-long\), more than data\.max_dropped_fraction=0\.5; raise data\.max_seq_len \(now 24\)",
    ):
        _prepare(tmp_path, rows, tiny_dir, "data.max_seq_len=24")
    folder = _prepare(tmp_path, rows, tiny_dir, "data.max_seq_len=24", "data.drop_longer=false", "data.max_dropped_fraction=1")
    (report,) = json.loads((folder / "meta.json").read_text())["sources"]
    assert (report["too_long"], report["kept"]) == (0, 20) and 0 < report["truncated"] < 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.columns={answer: out}", "data.columns.answer: is not a role; use one of prompt, response"),
        ("data.val_split=train", "data.val_split: is data.split (train): validation would be the training rows"),
        ("data.datasets=[{path: a.jsonl, weight: 0}]", "data.datasets[0].weight: 0.0 is not positive"),
        ("data.datasets=[{path: a.jsonl, columns: {text: [x]}}]", "data.datasets[0].columns.text: is not a column name"),
        ("data.datasets=[{path: a.jsonl, wieght: 3}]", "Did you mean: 'weight'"),
        ("data.datasets=[{path: a.jsonl}] ; data.path=b.jsonl", "data.path: is 'b.jsonl' but data.datasets lists the data sets"),
        ("data.chat_template=chat.jinja", "data.chat_template: is set but no data set uses data.template: chat"),
        ("data.max_dropped_fraction=2", "data.max_dropped_fraction: 2.0 is outside [0, 1]"),
    ],
)
def test_data_keys_are_checked_at_load(override: str, message: str) -> None:
    from launcher.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "recipes" / "tiny-cpu.yaml", override.split(" ; "))


@pytest.mark.parametrize("mixed", [False, True], ids=["parts", "parts-and-strings"])
def test_content_as_a_list_of_parts_is_trained_on_its_text(mixed: bool, tmp_path: Path, tiny_dir: Path, tokenizer: Any) -> None:
    """OpenAI's content parts ([{type: text, text: ...}]) are the text they hold; they were trained on
    as their Python repr (an answer read "[{'type': 'text', 'text': '2'}]"), issue 27."""
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    rows = [{"messages": parts}]
    if mixed:  # another row with plain strings: the same file holds both shapes
        rows.append({"messages": [{"role": "user", "content": "copy: fox"}, {"role": "assistant", "content": "fox"}]})
    folder = _prepare(tmp_path, rows, tiny_dir, "data.template=chat")
    train = TokenData(folder, "train")
    rendered = [([int(t) for t in train.input_ids[int(train.offsets[i]) : int(train.offsets[i + 1])]], i) for i in range(len(train))]
    expected = _chat_reference(tokenizer, CHAT)[0]
    assert expected in [ids for ids, _ in rendered]
    assert all("'type'" not in tokenizer.decode(ids) for ids, _ in rendered)


def test_a_content_part_that_is_not_text_is_refused_by_name(tmp_path: Path, tiny_dir: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}, CHAT[1]]}]
    with pytest.raises(DataError, match=r"\(row 1: a turn's content holds a part of type 'image_url'; this run trains on text only"):
        _prepare(tmp_path, rows, tiny_dir, "data.template=chat")


# Hostile rows (issue 27): a row the pipeline cannot read is counted, named by its row number and
# dropped within data.max_dropped_fraction; the file as a whole is refused only past it. Every count
# adds up to the rows read.
GOOD = [{"messages": [{"role": "user", "content": f"copy: w{i}"}, {"role": "assistant", "content": f"w{i}"}]} for i in range(30)]
STRICT = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _lines(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _prepare_bytes(tmp_path: Path, raw: bytes, tiny_dir: Path, *overrides: str, name: str = "d.jsonl") -> dict[str, Any]:
    source = tmp_path / name
    source.write_bytes(raw)
    data = _data(f"data.path={source}", "data.template=chat", *overrides)
    folder = prepare_data(data, str(source), tiny_dir, tmp_path / "cache", seed=1)
    return json.loads((folder / "meta.json").read_text())


def _accounted(report: dict[str, Any]) -> int:
    dropped = ("missing", "empty", "invalid", "duplicates", "too_long", "untrainable", "val_overlap", "val", "kept")
    return sum(report[k] for k in dropped)


BAD_ROWS = [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n', "line 31 is not valid UTF-8"),
    (b'{"messages": [\n', "line 31 is not JSON"),
    (b"[1, 2]\n", "line 31 is a JSON list, not an object"),
    (b'{"messages": 5}\n', "column 'messages' holds a number, not a list of turns"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}\n', "unknown role 'bot'"),
    (
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": {"a": 1}}]}\n',
        "content holds a part without a 'type'",
    ),
    (_lines([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}]), "chat template refused it"),
]


@pytest.mark.parametrize(("line", "why"), BAD_ROWS, ids=[w.split(" (")[0] for _, w in BAD_ROWS])
def test_a_row_that_cannot_be_read_is_counted_with_its_number(line: bytes, why: str, tmp_path: Path, tiny_dir: Path) -> None:
    """Each was a traceback (UnicodeDecodeError, TypeError, jinja2's TemplateError) or a whole-file refusal."""
    meta = _prepare_bytes(tmp_path, _lines(GOOD) + line, tiny_dir, f"data.chat_template={json.dumps(STRICT)}")
    (report,) = meta["sources"]
    assert (report["read"], report["invalid"], report["kept"]) == (31, 1, 30) and _accounted(report) == 31
    assert report["problems"][0].startswith("row 31: ") and why in report["problems"][0], report["problems"]
    many = _lines(GOOD[:2]) + line * 3
    with pytest.raises(DataError, match=r"d\.jsonl: 3 of 5 rows dropped \(60%: 3 invalid\).*fix or remove those rows \(row 3: ") as caught:
        _prepare_bytes(tmp_path, many, tiny_dir, f"data.chat_template={json.dumps(STRICT)}", "data.dedup=false")
    assert why.replace("line 31 ", "") in str(caught.value) and "\n" not in str(caught.value)


def test_one_json_document_with_a_bad_byte_is_refused_with_its_line(tmp_path: Path, tiny_dir: Path) -> None:
    raw = b'[\n{"messages": [{"role": "user", "content": "a"}]},\n{"messages": [{"role": "user", "content": "\xff"}]}\n]\n'
    with pytest.raises(DataError, match=r"d\.json: line 3 is not valid UTF-8 or JSON; fix or remove it"):
        _prepare_bytes(tmp_path, raw, tiny_dir, name="d.json")


def test_missing_and_empty_rows_are_counted_apart(tmp_path: Path, tiny_dir: Path) -> None:
    rows = [{"text": f"w{i} w{i}"} for i in range(20)] + [{"other": "x"}, {"text": None}, {"text": " "}]
    meta = _prepare_bytes(tmp_path, _lines(rows), tiny_dir, "data.template=text")
    (report,) = meta["sources"]
    assert (report["read"], report["missing"], report["empty"], report["kept"]) == (23, 2, 1, 20) and _accounted(report) == 23


def test_a_template_that_never_finishes_is_refused_in_bounded_time(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    from launcher.runtime.data import templates

    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"
    with pytest.raises(DataError, match=r"^data\.chat_template: rendering row 1 took over 0\.3 s; the template does not finish"):
        _prepare_bytes(tmp_path, _lines(GOOD), tiny_dir, f"data.chat_template={json.dumps(loop)}")
    with pytest.raises(DataError, match=r"^data\.chat_template \(inline\): is not a valid Jinja template \(line 1\): unexpected '}'"):
        _prepare_bytes(tmp_path, _lines(GOOD), tiny_dir, f"data.chat_template={json.dumps('{% for m in messages %}{{ m }')}")


@pytest.mark.parametrize("val", ["fraction", "path"])
def test_the_report_adds_up_with_an_over_long_row_in_each_split(val: str, tmp_path: Path, tiny_dir: Path) -> None:
    """One over-long validation row vanished from the counts (404 read, 403 accounted for)."""

    def long(i: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": f"go {i}"}, {"role": "assistant", "content": " ".join(["cat"] * 200)}]}

    train = GOOD[:20] + [long(i) for i in range(6)]
    held = [{"messages": [{"role": "user", "content": f"copy: v{i}"}, {"role": "assistant", "content": f"v{i}"}]} for i in range(9)]
    (tmp_path / "v.jsonl").write_bytes(_lines([*held, long(99)]))
    split = ["data.val_fraction=0.5"] if val == "fraction" else [f"data.val_path={tmp_path / 'v.jsonl'}"]
    meta = _prepare_bytes(tmp_path, _lines(train), tiny_dir, "data.max_seq_len=64", "data.max_dropped_fraction=0.3", *split)
    reports = meta["sources"] + meta["val_sources"]
    assert all(_accounted(r) == r["read"] for r in reports), reports
    assert sum(r["val"] for r in reports) == meta["val"]["documents"]
    if val == "path":
        assert [(r["read"], r["too_long"]) for r in reports] == [(26, 6), (10, 1)]
    else:
        assert reports[0]["too_long"] == 6 and reports[0]["val"] < 13  # over-long held-out rows were not counted


def test_a_50_mb_row_is_prepared_in_bounded_memory(tmp_path: Path, tiny_dir: Path) -> None:
    """Each row was tokenised whole before the max_seq_len check: 50 MB took 62 s and 7 GB; a cell is
    now cut where it must be over-long (columns.char_limit), so memory follows max_seq_len."""
    import subprocess
    import sys

    rows = [{"text": f"w{i} w{i}"} for i in range(20)] + [{"text": "cat " * (50 << 18)}]
    (tmp_path / "d.jsonl").write_bytes(_lines(rows))
    script = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from launcher.config import load_config\n"
        "from launcher.runtime.data.packing import prepare_data\n"
        "tmp, tiny = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "data = load_config(Path(sys.argv[3]), [f'data.path={tmp / \"d.jsonl\"}', 'data.template=text', 'data.packing=false',\n"
        "    'data.val_fraction=0', 'train.eval_exact_match=0']).data\n"
        "folder = prepare_data(data, str(tmp / 'd.jsonl'), tiny, tmp / 'cache', seed=1)\n"
        "print(json.dumps([json.loads((folder / 'meta.json').read_text())['sources'][0],\n"
        "    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tiny_dir), str(ROOT / "recipes" / "tiny-cpu.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report, peak_kib = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["too_long"], report["kept"]) == (1, 20)
    assert peak_kib < 1_400_000, f"peak RSS {peak_kib / 1024:.0f} MiB"  # ~0.8 GiB here; 7 GiB before
