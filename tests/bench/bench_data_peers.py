"""The rows bench_data.py prepares, through LLaMA-Factory's preprocessing as well as ours, side by side.
Not a test and not in CI: LLaMA-Factory lives in its own virtual environment (never in .venv).

    TOKENIZERS_PARALLELISM=false .venv/bin/python tests/bench/bench_data_peers.py --rows 200000 --num-proc 1 2 --repeats 2

(`--lf-python` names the venv's Python, /tmp/lfvenv/bin/python by default; results: RESULTS.md, "Beside
LLaMA-Factory's preprocessing".)

LLaMA-Factory's side is the data step of `llamafactory-cli train` (stage sft) with `tokenized_path`
set. In 0.9.5 that step saves the tokenised dataset and returns, and `run_sft` goes on to load the
model and train, so the child here calls what `run_sft` calls before the model, from the same YAML
settings (`get_train_args`, `load_tokenizer`, `get_template_and_fix_tokenizer`, `get_dataset`) and
stops before `load_model`. Settings, as close to bench_data.py's as LLaMA-Factory has them: OpenAI
`messages` (`formatting: sharegpt` with role/content tags), no `template` (so LLaMA-Factory parses
the tokenizer's own Jinja chat template into its slots), cutoff_len 1024, train_on_prompt false,
packing with neat_packing, val_size 0.05 (the tiny recipe's val_fraction), overwrite_cache.

Memory and time are measured as bench_data.py measures ours: the sum of PSS over the process tree
every 0.5 s (`bench_data.peak_tree_pss`), ru_maxrss of the process and its reaped workers, and wall
and CPU seconds (self + children) around the preparation alone, imports and interpreter start-up
excluded; "process s" is the whole child process, start-up and imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LF_PYTHON = "/tmp/lfvenv/bin/python"
IGNORE_INDEX = -100


def lf_settings(source: Path, model_dir: Path, num_proc: int, work: Path) -> dict:
    """The `llamafactory-cli train` YAML (as a dict) of one case, and its dataset_info.json written in `work`."""
    info = {
        "bench_chat": {
            "file_name": str(source),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (work / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return {
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset": "bench_chat",
        "dataset_dir": str(work),
        # no `template`: LLaMA-Factory then parses the tokenizer's chat template (parse_template)
        "cutoff_len": 1024,
        "train_on_prompt": False,
        "packing": True,
        "neat_packing": True,
        "val_size": 0.05,
        "preprocessing_num_workers": num_proc,
        "overwrite_cache": True,
        "tokenized_path": str(work / "tokenized"),
        "output_dir": str(work / "out"),
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_train_batch_size": 1,
        "num_train_epochs": 1.0,
        "seed": 42,
    }


def documents(mask: np.ndarray, length: int) -> int:
    """Documents in neat-packed rows: a new one starts wherever the mask's (nonzero) index changes."""
    rows = mask.reshape(-1, length)
    changed = np.diff(rows, axis=1, prepend=0) != 0
    return int((changed & (rows != 0)).sum())


def lf_child(settings_path: str) -> None:
    """Runs under LLaMA-Factory's Python: its sft data step, then counts what it saved."""
    settings = json.loads(Path(settings_path).read_text())
    # /tmp/lfvenv's torchvision 0.28.0 and torchaudio 2.11.1 do not load with its torch 2.13.0+cpu
    # ("operator torchvision::nms does not exist"; "Could not load this library: .../_torchaudio.so"),
    # yet transformers imports torchvision when it finds it, and llamafactory.data.mm_plugin imports
    # torchaudio at the top (for torchaudio.load of audio inputs only). Text rows need neither:
    # both are hidden from transformers (find_spec -> None; it caches the answer), then torchaudio
    # becomes an empty module for mm_plugin's import; nothing calls it on text rows.
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    sys.modules["torchaudio"] = None  # type: ignore[assignment]
    import transformers  # noqa: F401

    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    from datasets import load_from_disk
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    def cpu_now() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, cpu = time.perf_counter(), cpu_now()
    model_args, data_args, training_args, _, _ = get_train_args(settings)
    tokenizer_module = load_tokenizer(model_args)  # what run_sft does first, in this order
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    seconds, cpu = time.perf_counter() - start, cpu_now() - cpu
    largest = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    saved = load_from_disk(settings["tokenized_path"])
    counts = {}
    for split in saved:
        table = saved[split].data.table
        mask = table.column("attention_mask").combine_chunks().flatten().to_numpy()
        labels = table.column("labels").combine_chunks().flatten().to_numpy()
        counts[split] = {
            "rows": table.num_rows,
            "row_length": len(table.column("input_ids")[0]),
            "tokens": int((mask != 0).sum()),  # neat packing: 1, 2, ... per document, 0 on padding
            "label_tokens": int((labels != IGNORE_INDEX).sum()),
            "documents": documents(mask, len(table.column("input_ids")[0])),
        }
    template_text = tokenizer_module["tokenizer"].chat_template
    print(json.dumps({"seconds": seconds, "cpu": cpu, "max_process_mib": largest, "splits": counts, "template": template_text}))


def measure_lf(python: str, source: Path, model_dir: Path, num_proc: int, work: Path) -> dict:
    from bench_data import peak_tree_pss

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = work / "settings.json"
    settings.write_text(json.dumps(lf_settings(source, model_dir, num_proc, work), indent=2))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",  # its pins are checked against the venv it was installed in
        "HF_DATASETS_CACHE": str(work / "hf-datasets"),  # its json → Arrow cache starts empty, as ours does
    }
    start = time.perf_counter()
    log = work / "llamafactory.log"
    with log.open("w") as err:
        proc = subprocess.Popen([python, __file__, "--lf-child", str(settings)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        peak = peak_tree_pss(proc)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{tail}\nLLaMA-Factory num_proc {num_proc}: preprocessing failed ({proc.returncode}); log: {log}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    result["peak_tree_mib"] = peak / 2**20
    return result


def measure_ours(source: Path, num_proc: int, cache: Path) -> dict:
    from bench_data import measure

    start = time.perf_counter()
    result = measure(source, num_proc, cache)
    result["process_seconds"] = time.perf_counter() - start
    (folder,) = (p.parent for p in cache.glob("*/meta.json"))
    meta = json.loads((folder / "meta.json").read_text())
    result["val"] = meta.get("val", {})
    for split in ("train", "val"):  # target_mask: 1 where the token is its own label (LLaMA-Factory's labels != -100)
        mask = folder / split / "target_mask.npy"
        result[split]["label_tokens"] = int(np.load(mask, mmap_mode="r").sum(dtype=np.int64)) if mask.exists() else 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lf-python", default=LF_PYTHON, help="the Python of a venv with llamafactory installed")
    parser.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--lf-child", default="")
    args = parser.parse_args()
    if args.lf_child:
        lf_child(args.lf_child)
        return
    if not Path(args.lf_python).exists():
        raise SystemExit(f"error: --lf-python: {args.lf_python} does not exist; give the Python of a venv with llamafactory")
    from bench_data import write_rows

    from launcher.runtime.model.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"chat-{args.rows}.jsonl"
    chars = write_rows(source, args.rows)
    print(f"wrote {args.rows} rows, {chars / 1e6:.0f} M content characters, {source.stat().st_size / 2**20:.0f} MiB", flush=True)
    print(
        "| tool | num_proc | wall s | process s | CPU s | rows/s | peak PSS (tree) | largest RSS | train rows x length "
        "| train tokens | trained (label) tokens | val rows | load avg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    template_shown = False
    try:
        for _ in range(args.repeats):
            for num_proc in args.num_proc:  # interleaved, so a change in the machine's load hits every case
                load = os.getloadavg()[0]
                r = measure_ours(source, num_proc, work / "ours")
                train, val = r["train"], r.get("val", {})
                print(
                    f"| launcher | {num_proc} | {r['seconds']:.0f} | {r['process_seconds']:.0f} | {r['cpu']:.0f} "
                    f"| {args.rows / r['seconds']:,.0f} | {r['peak_tree_mib']:,.0f} MiB | {r['max_process_mib']:,.0f} MiB "
                    f"| {train['rows']:,} x 1024 | {train['tokens']:,} | {train['label_tokens']:,} | {val.get('rows', '-')} "
                    f"| {load:.1f}-{os.getloadavg()[0]:.1f} |",
                    flush=True,
                )
                print(f"    ours, meta: train {json.dumps(train)}; source {json.dumps(r['source'])}", flush=True)
                load = os.getloadavg()[0]
                r = measure_lf(args.lf_python, source, model_dir, num_proc, work / "llamafactory")
                train, val = r["splits"]["train"], r["splits"].get("validation", {})
                print(
                    f"| LLaMA-Factory | {num_proc} | {r['seconds']:.0f} | {r['process_seconds']:.0f} | {r['cpu']:.0f} "
                    f"| {args.rows / r['seconds']:,.0f} | {r['peak_tree_mib']:,.0f} MiB | {r['max_process_mib']:,.0f} MiB "
                    f"| {train['rows']:,} x {train['row_length']} | {train['tokens']:,} | {train['label_tokens']:,} "
                    f"| {val.get('rows', '-')} | {load:.1f}-{os.getloadavg()[0]:.1f} |",
                    flush=True,
                )
                print(f"    LLaMA-Factory, saved: {json.dumps(r['splits'])}", flush=True)
                if not template_shown:
                    print(f"    LLaMA-Factory's tokenizer chat template after its fix-up: {r['template']!r}", flush=True)
                    template_shown = True
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
