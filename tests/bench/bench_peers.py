"""Benchmark: issue 15's job, `launcher run` against the Hugging Face Trainer, interleaved. Not a test.

    .venv/bin/python tests/bench/bench_peers.py [--repeats 3] [--quick] [--cases ...]

The job: a 2-layer Llama (d 64, 4 heads / 2 KV heads, FFN 128, vocab 1,000, about 202k
parameters) built locally, 2,000 single-turn chat rows of 18-154 tokens, sequence 256,
micro-batch 4 x 2 gloo processes (global batch 8, no accumulation), 40 steps, AdamW lr 1e-3
constant, no weight decay, clip 1.0, fp32, prompt masked. Both tools get the same token ids and
labels: the Trainer's rows are the launcher's own tokenisation (`launcher.runtime.data.tokenize`),
written to a JSON file once, so its workers do no tokenising (in its favour on the first step).

Cases run A B C ... B C A ... (rotated each repeat), after one untimed 2-step warm-up pass (data cache, page cache,
DeepSpeed's shared-memory op). Per run: steady real tokens/s (non-padding input tokens, steps
SKIP+1..40 over the wall time between the end of step SKIP and of step 40), time to first step
(from just before the command the user types starts, `launcher run` or `torchrun`, to the end of
the first optimizer step: the stamped `step 1/` line, or the Trainer callback's wall clock), the
padding fraction (padding / all input positions), and peak RSS per process (bench_startup's
sampler, every 0.05 s). Medians over the repeats; ratios to the Trainer (padded) of the same run,
and to the "bare" Trainer (padded, with peft, bitsandbytes and DeepSpeed hidden from it: it imports
peft, and through it bitsandbytes, whenever they are installed). Results: tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
VOCAB, ROWS, SEQ, MICRO, PROCS, STEPS, LR, SEED = 1000, 2000, 256, 4, 2, 40, 1e-3, 1234
SKIP = 10  # steady state: steps after the 10th
MIN_TOKENS, MAX_TOKENS = 18, 154
WORDS = (
    "cat dog fox owl bee ant elk yak emu cow pig hen bat rat eel cod jay ram ewe doe red blue green black white pink "
    "gray gold teal navy plum rose sand snow rust mint sun moon star rain wind fire ice rock tree leaf seed root fern "
    "moss lake sea hill cup pen box key map bag hat car bus cap jar pot pan mug fan lamp door desk bell run sit jump "
    "swim read walk talk sing play cook draw fly dig hop nap"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LAUNCHER_CASES = {
    "launcher, packed, default (auto)": [],
    "launcher, packed, fsdp": ["parallel.backend=fsdp"],
    "launcher, packed, ddp": ["parallel.backend=ddp"],
    "launcher, packed, deepspeed ZeRO-2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "launcher, padded, default (auto)": ["data.packing=false"],
}
TRAINER_CASES = {"HF Trainer, padded": "padded", "HF Trainer, flattening": "flatten", "HF Trainer, padded, bare": "padded-bare"}
BASELINE = "HF Trainer, padded"
# The Trainer imports peft (and through it bitsandbytes) whenever they are installed, as they are in
# this venv (the launcher's extras); "bare" hides them and DeepSpeed: a plain transformers install.
BARE_HIDDEN = ("peft", "bitsandbytes", "deepspeed")


# ---- the job, built once under .cache/bench_peers -------------------------------------------------


def build_assets(work: Path) -> dict[str, Path]:
    """Tokenizer + model directory, chat rows, the recipe, and the rows tokenised for the Trainer."""
    model, rows, recipe, tokens = work / "model", work / "chat.jsonl", work / "peers.yaml", work / "tokens.json"
    if not (model / "model.safetensors").exists():
        _build_model(model, _build_tokenizer(model))
    if not rows.exists():
        rows.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(model)))
    recipe.write_text(_recipe(model, rows))
    if not tokens.exists():
        from transformers import AutoTokenizer

        from launcher.config import load_config
        from launcher.runtime.data import CleanReport, clean, load_records, tokenize

        cfg = load_config(recipe)
        tok = AutoTokenizer.from_pretrained(model)
        kept = clean(load_records(str(rows), "auto", "train"), cfg.data, CleanReport())
        examples = [tokenize(r, cfg.data, tok) for r in kept]
        tokens.write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))
    return {"model": model, "rows": rows, "recipe": recipe, "tokens": tokens}


def _build_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)] + [
        f"{a} {b} {a * b}" for a in range(60) for b in range(60)
    ]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def _build_model(path: Path, tok: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPE,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def _chat_rows(model: Path) -> list[dict[str, Any]]:
    """ROWS single-turn chats whose templated length is uniform in [MIN_TOKENS, MAX_TOKENS]."""
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(model), random.Random(SEED)
    out: list[dict[str, Any]] = []
    while len(out) < ROWS:
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        words = max(2, target - 8)  # the template costs about 8 tokens
        split = rng.randint(1, words - 1)
        text = [rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 3599)) for _ in range(words)]
        messages = [{"role": "user", "content": " ".join(text[:split])}, {"role": "assistant", "content": " ".join(text[split:])}]
        if MIN_TOKENS <= len(tok.apply_chat_template(messages, tokenize=True, return_dict=False)) <= MAX_TOKENS:
            out.append({"messages": messages})
    return out


def _recipe(model: Path, rows: Path) -> str:
    return f"""run: {{name: peers, seed: {SEED}}}
model: {{name_or_path: {model}, dtype: float32}}
method: {{name: full}}
data: {{path: {rows}, template: chat, max_seq_len: {SEQ}, packing: true, val_fraction: 0.0}}
optim: {{lr: {LR}, weight_decay: 0.0, scheduler: constant, warmup_steps: 0, max_grad_norm: 1.0}}
train: {{micro_batch_size: {MICRO}, global_batch_size: {MICRO * PROCS}, max_steps: {STEPS}, precision: fp32, log_every: 1,
        eval_batches: 0, eval_exact_match: 0}}
checkpoint: {{every: 0, resume: never}}
cluster: {{accelerator: cpu, nodes: 1, gpus_per_node: {PROCS}, cpus_per_task: {PROCS}}}
"""


# ---- one run of each tool -------------------------------------------------------------------------


class Watched:
    """One command's run: its start (wall clock), peak RSS MiB by process, the wall clock of each
    `step N/` line, and the workers' CPU seconds (user + system, summed) sampled against the wall clock."""

    def __init__(self, t0: float, peaks: dict[str, float], stamps: dict[int, float], cpu: list[tuple[float, float]]) -> None:
        self.t0, self.peaks, self.stamps, self.cpu = t0, peaks, stamps, cpu

    def cpu_at(self, when: float) -> float:
        """The workers' CPU seconds at the last sample before `when`."""
        return max((c for t, c in self.cpu if t <= when), default=0.0)


def _cpu(root: Any, kind_of: Any, out: list[tuple[float, float]], stop: threading.Event) -> None:
    import psutil

    seen: dict[int, float] = {}
    while not stop.is_set():
        try:
            for child in root.children(recursive=True):
                try:
                    if kind_of(" ".join(child.cmdline())) == "worker":
                        times = child.cpu_times()
                        seen[child.pid] = times.user + times.system
                except psutil.Error:
                    continue
        except psutil.Error:
            break
        out.append((time.time(), sum(seen.values())))
        time.sleep(0.05)


def _watch(argv: list[str], env: dict[str, str], kind_of: Any, root_name: str) -> Watched:
    """Run argv, stamping its `step N/` output lines, sampling RSS (bench_startup's sampler) and CPU."""
    import psutil
    from bench_startup import sample

    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    peaks: dict[str, float] = {}
    cpu: list[tuple[float, float]] = []
    stop = threading.Event()
    root = psutil.Process(proc.pid)
    threads = [
        threading.Thread(target=sample, args=(root, peaks, stop, kind_of, root_name), daemon=True),
        threading.Thread(target=_cpu, args=(root, kind_of, cpu, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    lines: list[str] = []
    stamps: dict[int, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "step " in line and "/" in line:
            head = line.split("step ", 1)[1].split("/", 1)[0]
            if head.isdigit():
                stamps.setdefault(int(head), time.time())
    proc.wait()
    stop.set()
    for thread in threads:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}:\n{''.join(lines[-40:])}")
    return Watched(t0, peaks, stamps, cpu)


def _memory(peaks: dict[str, float], parents: list[str]) -> dict[str, float]:
    """Peak RSS of the workers (the largest) and of the parents that ran (`launcher run` has had no
    torchrun agent below it since launcher/ranks.py; a launch.sh run still has one)."""
    workers = [v for k, v in peaks.items() if k.startswith("worker")]
    parents = [p for p in parents if p in peaks]
    out = {f"rss {p}": peaks[p] for p in parents}
    out["rss worker (max)"] = max(workers, default=0.0)
    out["rss parents"] = sum(peaks[p] for p in parents)
    return out


def run_launcher(assets: dict[str, Path], overrides: list[str], out: Path, steps: int) -> dict[str, float]:
    argv = [str(BIN / "launcher"), "run", str(assets["recipe"]), f"train.max_steps={steps}", *overrides, "--out", str(out)]
    env = {**os.environ}
    from bench_startup import launcher_kind

    watched = _watch(argv, env, launcher_kind, "launcher run")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    by_step = {r["step"]: r for r in records}
    skip = min(SKIP, steps - 1)
    steady = [r for r in records if r["step"] > skip]
    real = sum(r["tokens"] for r in records)
    pads = sum(r["pad_tokens"] for r in records)
    seconds = by_step[steps]["elapsed"] - by_step[skip]["elapsed"]
    first = watched.stamps[1] - watched.t0
    result = {"tokens/s": sum(r["tokens"] for r in steady) / seconds, "first step s": first, "padding": pads / (real + pads)}
    cpu = watched.cpu_at(watched.stamps[steps]) - watched.cpu_at(watched.stamps[skip])
    result["tokens/cpu s"] = sum(r["tokens"] for r in steady) / max(cpu, 1e-9)
    result["loss"] = by_step[steps]["loss"]
    return {**result, **_memory(watched.peaks, ["launcher run", "agent"])}


def run_trainer(assets: dict[str, Path], collator: str, out: Path, steps: int) -> dict[str, float]:
    argv = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(PROCS), __file__, "--hf-worker", collator]
    argv += ["--steps", str(steps), "--dir", str(out), "--model", str(assets["model"]), "--tokens", str(assets["tokens"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def kind_of(cmd: str) -> str | None:
        return "worker" if "--hf-worker" in cmd else None

    watched = _watch(argv, env, kind_of, "torchrun agent")
    ranks = [json.loads((out / f"steps-{r}.json").read_text()) for r in range(PROCS)]
    skip = min(SKIP, steps - 1)
    # each rank's (end time, real, all) per step; a step ends when the slower rank ends it
    ends = [max(rk[i][0] for rk in ranks) for i in range(steps)]
    real = [sum(rk[i][1] for rk in ranks) for i in range(steps)]
    total = [sum(rk[i][2] for rk in ranks) for i in range(steps)]
    result = {"tokens/s": sum(real[skip:]) / (ends[steps - 1] - ends[skip - 1]), "first step s": ends[0] - watched.t0}
    result["padding"] = 1 - sum(real) / sum(total)
    cpu = watched.cpu_at(ends[steps - 1]) - watched.cpu_at(ends[skip - 1])
    result["tokens/cpu s"] = sum(real[skip:]) / max(cpu, 1e-9)
    result["loss"] = ranks[0][-1][3]
    return {**result, **_memory(watched.peaks, ["torchrun agent"])}


def hf_worker(args: argparse.Namespace) -> None:
    """One rank of the Trainer baseline (under torchrun): padded or DataCollatorWithFlattening."""
    if args.hf_worker.endswith("-bare"):
        for name in BARE_HIDDEN:  # importlib.util.find_spec answers None: transformers sees them absent
            sys.modules[name] = None  # type: ignore[assignment]
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = json.loads(Path(args.tokens).read_text())
    # use_cache=False: with the cache on, the CPU sdpa path ignores position_ids and attends across packed examples
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32, use_cache=False)
    if args.hf_worker == "flatten":
        collator: Any = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    steps: list[list[float]] = []
    counted = {"real": 0, "all": 0, "loss": 0.0}

    class Counting(Trainer):
        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            mask = inputs.get("attention_mask")
            counted["real"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            counted["all"] += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            counted["loss"] = float(loss)
            return loss

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append([time.time(), counted["real"], counted["all"], counted["loss"]])
            counted["real"] = counted["all"] = 0

    training = TrainingArguments(
        output_dir=args.dir,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        use_cpu=True,
        ddp_backend="gloo",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Counting(model=model, args=training, train_dataset=dataset, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    (Path(args.dir) / f"steps-{rank}.json").write_text(json.dumps(steps))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---- the table --------------------------------------------------------------------------------------

COLUMNS = ["tokens/s", "tokens/cpu s", "first step s", "padding", "rss worker (max)", "rss parents", "loss"]


def _ratio(runs: list[dict[str, float]], base: list[dict[str, float]] | None, key: str) -> str:
    """Per repeat against the baseline of the same repeat, then the median."""
    return f"{statistics.median(r[key] / b[key] for r, b in zip(runs, base, strict=False)):.2f}" if base else "-"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Medians per case, with ratios to the Trainer (padded) and to the bare Trainer (padded) of the same repeat."""
    mb = 2**20 / 1e6
    head = "| case | steady real tokens/s | x Trainer | x bare | per worker CPU s | x Trainer | first step s | x Trainer | x bare "
    head += "| padding | peak RSS MB: worker (max) / parents | loss at the end |"
    lines = [head, "|---|" + "---:|" * 12]
    base, bare = results.get(BASELINE), results.get(BASELINE + ", bare")
    for name, runs in results.items():
        med = {c: statistics.median(r[c] for r in runs) for c in COLUMNS}
        kinds = [k for k in runs[0] if k.startswith("rss ") and k not in ("rss worker (max)", "rss parents")]
        parents = " + ".join(f"{statistics.median(r[k] for r in runs) * mb:.0f}" for k in kinds)
        lines.append(
            f"| {name} | {med['tokens/s']:,.0f} | {_ratio(runs, base, 'tokens/s')} | {_ratio(runs, bare, 'tokens/s')} "
            f"| {med['tokens/cpu s']:,.0f} | {_ratio(runs, base, 'tokens/cpu s')} "
            f"| {med['first step s']:.1f} | {_ratio(runs, base, 'first step s')} | {_ratio(runs, bare, 'first step s')} "
            f"| {100 * med['padding']:.1f} % | {med['rss worker (max)'] * mb:.0f} / {parents} = {med['rss parents'] * mb:.0f} "
            f"| {med['loss']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke check: one repeat of 12 steps, no warm-up pass")
    parser.add_argument("--cases", nargs="*", default=[], help="substrings of the case names to run (default: all)")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench_peers"))
    parser.add_argument("--hf-worker", choices=sorted(TRAINER_CASES.values()))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--dir", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--tokens", default="")
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    for key, value in (("LAUNCHER_CACHE_DIR", str(ROOT / ".cache" / "launcher")), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(work)
    steps, repeats = (12, 1) if args.quick else (args.steps, args.repeats)
    cases: dict[str, Any] = {**LAUNCHER_CASES, **TRAINER_CASES}
    names = [n for n in cases if not args.cases or any(c in n for c in args.cases)]

    def once(name: str, out: Path, n: int) -> dict[str, float]:
        shutil.rmtree(out, ignore_errors=True)
        if name in LAUNCHER_CASES:
            return run_launcher(assets, LAUNCHER_CASES[name], out, n)
        return run_trainer(assets, TRAINER_CASES[name], out, n)

    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    if not args.quick:
        for name in names:
            once(name, work / "runs" / f"warm-{names.index(name)}", 2)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(repeats):
        # Rotated each repeat: the case right after the Trainer measured slower whichever it was
        # (its workers' exit and page cache), so no case keeps that seat.
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            i = names.index(name)
            r = once(name, work / "runs" / f"r{rep}-{i}", steps)
            results[name].append(r)
            print(f"repeat {rep + 1} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()), flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    print(f"\nmedians of {repeats}; {steps} steps; steady = steps {SKIP + 1}-{steps}; real = non-padding input tokens\n")
    print(table(results))


if __name__ == "__main__":
    main()
