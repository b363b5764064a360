"""`launcher preview`: the first prepared training rows, token by token, the trained ones marked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _support import launcher_cli


def test_preview_marks_exactly_the_trained_tokens() -> None:
    text = launcher_cli("preview", "tiny-cpu.yaml", "-n", "2").stdout
    assert text.startswith("data: tiny-tasks: read ") and "\x1b" not in text  # not a terminal: no colour
    assert "--- example 1 (row " in text and "--- example 2 (row " in text and "--- example 3" not in text
    assert "--- document 2 of " in text  # packed rows show their documents one by one
    found = json.loads(launcher_cli("preview", "tiny-cpu.yaml", "-n", "2", "--json").stdout)
    assert found["report"] == text.split("\n\n")[0].splitlines()
    first = found["examples"][0]
    assert first["tokens"] == sum(len(d) for d in first["documents"])
    assert first["trained"] == sum(t["trained"] for d in first["documents"] for t in d) > 0
    # the instruction template trains on the response only: the marked span is the first document's answer
    document = first["documents"][0]
    answer = "".join(t["text"] for t in document if t["trained"])
    assert "Instruction" not in answer and answer.endswith("</s>")
    block = text.split("--- document 2 of ")[0]
    assert f"[[{answer}]]" in block and block.count("[[") == 1
    # the marks are the cache's own labels: the row as the ranks read it (labels != -100)
    import numpy as np

    from launcher.runtime.data import IGNORE_INDEX
    from launcher.runtime.data.packing import TokenData

    batch = TokenData(Path(found["cache"]), "train").batch([first["row"]])
    length = int(batch.lengths[0]) if batch.lengths is not None else first["tokens"]
    marked = [t["trained"] for d in first["documents"] for t in d]
    assert marked == (np.asarray(batch.labels[0][:length]) != IGNORE_INDEX).tolist()
    assert [t["id"] for d in first["documents"] for t in d] == batch.input_ids[0][:length].tolist()


def test_preview_of_classification_shows_text_and_label() -> None:
    text = launcher_cli("preview", "tiny-cpu-classification.yaml", "-n", "1").stdout
    header = next(line for line in text.splitlines() if line.startswith("--- example 1"))
    assert header.endswith(("label positive", "label negative")) and "[[" not in text
    found = json.loads(launcher_cli("preview", "tiny-cpu-classification.yaml", "-n", "1", "--json").stdout)
    assert found["examples"][0]["label"] in ("positive", "negative")


def test_preview_imports_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from launcher.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['preview', 'tiny-cpu.yaml', '-n', '1']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
