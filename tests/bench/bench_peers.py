"""Benchmark: issue 15's job, `launcher run` against the Hugging Face Trainer, interleaved. Not a test.

    .venv/bin/python tests/bench/bench_peers.py [--repeats 3] [--quick] [--cases SUBSTRING ...]

The job: a 2-layer Llama (d 64, 4 heads / 2 KV heads, FFN 128, vocab 1,000, about 202k
parameters) built locally, 2,000 single-turn chat rows of 18-154 tokens, sequence 256,
micro-batch 4 x 2 gloo processes (global batch 8, no accumulation), 40 steps, AdamW lr 1e-3
constant, no weight decay, clip 1.0, fp32, prompt masked. Both tools get the same token ids and
labels: the Trainer's rows are the launcher's own tokenisation (`launcher.runtime.data.tokenize`),
written to a JSON file once, so its workers do no tokenising (in its favour on the first step).

Both tools are measured the same way, from inside their workers, by a probe neither knows about:
tests/bench/peers_hook/sitecustomize.py, first on PYTHONPATH for the command and everything it
starts. It patches `torch.nn.Embedding.forward` in whichever process imports torch (a worker forked
from a parent that imported torch inherits it) and stamps each forward in training mode: the wall
clock, RANK at the call, the tokens that are not the pad id, all tokens; and the end of each
process's first optimizer step (torch's global post-step hook). From those stamps alone:
- first forward: rank 0's first training forward, seconds from just before the command the user
  types (`launcher run` or `torchrun`) starts;
- steady real tokens/s: the non-pad tokens the embeddings of all ranks saw in steps SKIP+1..N-1,
  over the wall time from the forward of step SKIP+1 to the forward of step N (each step starts when
  its slowest rank's forward starts);
- padding: pad-id tokens over all tokens the embeddings saw (what the model computes on; rows or
  slots dropped before the model are not padding, padded slots added for attention are).
Peak RSS: every process in the command's tree (looked for every 0.2 s) is read every 0.05 s (its
kernel high-water mark, VmHWM, so a peak between two reads still counts); the workers are the
processes that ran a training forward, "everything else" is the sum of every other process's peak
(the supervisor or agent, a pre-importing parent, helpers). RSS counts pages a forked worker shares
with its parent in both, so the tree's proportional set size (PSS, summed over the tree, read every
2 s: each read costs the machine ~12 ms per worker) is given too.
Kept from before, each tool's own figures: tokens/s and padding from metrics.jsonl (launcher) or the
attention mask (Trainer), and "step-1 line": the `step 1/` line as it reaches this script through
`launcher run`'s pipe, or the Trainer callback's `on_step_end` wall clock (slower rank); with "step 1
end", the probe's end of rank 0's first optimizer step, they show where the clocks differ. "CPU s of
the tree by then": user + system seconds of every process in the tree at rank 0's first forward (a
start-up figure the load moves less than the wall clock).

Cases run A B C ... B C A ... (rotated each repeat), after one untimed 2-step warm-up pass (data
cache, page cache, DeepSpeed's shared-memory op). Medians over the repeats; ratios are taken per
repeat against the Trainer (padded) of the same repeat, then the median. Results: tests/bench/RESULTS.md.
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
train: {{micro_batch_size: {MICRO}, global_batch_size: {MICRO * PROCS}, max_steps: {STEPS}, precision: fp32,
        eval_batches: 0, eval_exact_match: 0}}
checkpoint: {{every: 0, resume: never}}
cluster: {{accelerator: cpu, nodes: 1, gpus_per_node: {PROCS}, cpus_per_task: {PROCS}}}
"""


# ---- one run of each tool -------------------------------------------------------------------------

HOOK = Path(__file__).resolve().parent / "peers_hook"  # its sitecustomize.py: the probe
# The sampler's own cost falls on the 2 cores the ranks share, so it reads little often: the tree's
# members every 4th tick (psutil walks every process, ~1.5 ms), the PSS every 40th (smaps_rollup
# walks a process's page tables: ~12 ms for a 600 MB worker).
FIND_EVERY, PSS_EVERY = 4, 40


class Tree:
    """What the sampler saw of one command's process tree: per process its peak RSS (MB, from the
    kernel's high-water mark), its command line, its CPU seconds over time, and the tree's peak PSS."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak: dict[int, float] = {}
        self.label: dict[int, str] = {}
        # A fork of another process of the tree (same command line as its parent, e.g. the short-lived
        # middle process launcher/zygote.py forks a rank through): its RSS and high-water mark are its
        # parent's pages, shared, not memory it used; it counts by its private pages (USS) instead.
        self.forks: set[int] = set()
        self.private: dict[int, float] = {}
        self.cpu: list[tuple[float, dict[int, float]]] = []
        self.pss_peak = 0.0

    def cpu_at(self, when: float, pids: set[int]) -> float:
        """CPU seconds (user + system) of these processes together at the last sample before `when`."""
        last: dict[int, float] = {}
        for t, seen in self.cpu:
            if t > when:
                break
            last.update(seen)
        return sum(v for pid, v in last.items() if pid in pids)


def _kib(path: str, field: str) -> int:
    """A `Field:   123 kB` line's value from a /proc file (0 if absent: a zombie has none)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _sample(tree: Tree, stop: threading.Event) -> None:
    import psutil

    root, tick = psutil.Process(tree.root), 0
    procs: list[Any] = []
    while not stop.is_set():
        if tick % FIND_EVERY == 0:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
        cpu: dict[int, float] = {}
        pss = 0
        for proc in procs:
            try:
                if proc.pid not in tree.label:
                    tree.label[proc.pid] = " ".join(proc.cmdline())
                    if tree.label.get(proc.ppid()) == tree.label[proc.pid] and proc.pid != tree.root:
                        tree.forks.add(proc.pid)
                if proc.pid in tree.forks:
                    rollup = f"/proc/{proc.pid}/smaps_rollup"
                    private = _kib(rollup, "Private_Clean:") + _kib(rollup, "Private_Dirty:")
                    tree.private[proc.pid] = max(tree.private.get(proc.pid, 0.0), private * 1024 / 1e6)
                hwm = _kib(f"/proc/{proc.pid}/status", "VmHWM:")
                tree.peak[proc.pid] = max(tree.peak.get(proc.pid, 0.0), hwm * 1024 / 1e6)
                times = proc.cpu_times()
                cpu[proc.pid] = times.user + times.system
                if tick % PSS_EVERY == 0:
                    pss += _kib(f"/proc/{proc.pid}/smaps_rollup", "Pss:")
            except (psutil.Error, OSError):
                continue
        tree.cpu.append((time.time(), cpu))
        if tick % PSS_EVERY == 0:
            tree.pss_peak = max(tree.pss_peak, pss * 1024 / 1e6)
        tick += 1
        time.sleep(0.05)


class Watched:
    """One command's run: its start (wall clock), its tree, the wall clock of each `step N/` line it
    printed, and the probe's records per process: forwards [time, rank, real, all] and the end of the
    first optimizer step [time, rank]."""

    def __init__(self, t0: float, tree: Tree, lines: dict[int, float], probe: Path) -> None:
        self.t0, self.tree, self.lines = t0, tree, lines
        self.forwards: dict[int, list[list[Any]]] = {}
        self.first_step: dict[str, float] = {}
        for path in probe.glob("forwards-*.jsonl"):
            pid = int(path.stem.split("-")[1])
            for record in map(json.loads, path.read_text().splitlines()):
                if isinstance(record, dict):
                    time_, rank = record["step"]
                    self.first_step[rank] = min(self.first_step.get(rank, time_), time_)
                else:
                    self.forwards.setdefault(pid, []).append(record)

    @property
    def workers(self) -> set[int]:
        return set(self.forwards)

    def figures(self, steps: int) -> dict[str, float]:
        """The probe's figures (module docstring), the same for both tools."""
        ranks: dict[str, list[list[Any]]] = {}
        for records in self.forwards.values():
            ranks.setdefault(records[0][1], []).extend(records)
        for records in ranks.values():
            records.sort()
            assert len(records) == steps, f"{len(records)} training forwards on a rank for {steps} steps (one micro-batch each)"
        starts = [max(r[i][0] for r in ranks.values()) for i in range(steps)]
        real = [sum(r[i][2] for r in ranks.values()) for i in range(steps)]
        total = [sum(r[i][3] for r in ranks.values()) for i in range(steps)]
        skip = _skip(steps)
        window = starts[steps - 1] - starts[skip]
        steady = sum(real[skip : steps - 1])
        cpu = self.tree.cpu_at(starts[steps - 1], self.workers) - self.tree.cpu_at(starts[skip], self.workers)
        others = [pid for pid in self.tree.peak if pid not in self.workers]
        first = ranks["0"][0][0]
        return {
            "tokens/s": steady / window if window > 0 else 0.0,  # 0: the warm-up pass, too short for a window
            "tokens/cpu s": steady / max(cpu, 1e-9),
            "first forward s": first - self.t0,
            "cpu s to first forward": self.tree.cpu_at(first, set(self.tree.peak)),
            "step 1 end s": self.first_step["0"] - self.t0,
            "padding": 1 - sum(real) / sum(total),
            "rss worker (max)": max(self.tree.peak.get(pid, 0.0) for pid in self.workers),
            "rss others": sum(self._counted(pid) for pid in others),
            "pss tree": self.tree.pss_peak,
        }

    def _counted(self, pid: int) -> float:
        """A process's memory for "everything else": its peak RSS, or a fork's private pages (Tree)."""
        return self.tree.private.get(pid, 0.0) if pid in self.tree.forks else self.tree.peak[pid]

    def others(self, root_name: str) -> str:
        """The processes besides the workers, with their peaks: `launcher run 84, python -m x 12`
        (a fork: `fork of python -m x 0.4 private (282 shared)`)."""
        parts = []
        for pid, mb in self.tree.peak.items():
            if pid not in self.workers and mb > 0:  # 0: only ever seen as a zombie
                argv = self.tree.label.get(pid, "?").split()
                name = root_name if pid == self.tree.root else " ".join([Path(argv[0]).name, *argv[1:3]]) if argv else "?"
                if pid in self.tree.forks:
                    parts.append(f"fork of {name} {self._counted(pid):.1f} private ({mb:.0f} shared)")
                else:
                    parts.append(f"{name} {mb:.0f}")
        return ", ".join(parts)


def _skip(steps: int) -> int:
    return min(SKIP, steps // 2)  # 10: a step the launcher logs (log_every 10); --quick's 12 steps: 6


def _watch(argv: list[str], env: dict[str, str], probe: Path, pad_id: int, cwd: Path = ROOT) -> Watched:
    """Run argv with the probe on its PYTHONPATH, stamping its `step N/` lines and sampling its tree."""
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir(parents=True)
    path = os.pathsep.join(p for p in (str(HOOK), env.get("PYTHONPATH", "")) if p)
    env = {**env, "PYTHONPATH": path, "BENCH_PEERS_PROBE": str(probe), "BENCH_PEERS_PAD_ID": str(pad_id)}
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    tree, stop = Tree(proc.pid), threading.Event()
    sampler = threading.Thread(target=_sample, args=(tree, stop), daemon=True)
    sampler.start()
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
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}:\n{''.join(lines[-40:])}")
    return Watched(t0, tree, stamps, probe)


def run_launcher(
    assets: dict[str, Path], overrides: list[str], out: Path, steps: int, tree: Path | None = None
) -> tuple[dict[str, float], str]:
    """`launcher run` of this checkout, or of `tree` (its code first on PYTHONPATH and its folder the
    working directory, which `python -m` puts first for the ranks)."""
    every = [] if _skip(steps) == SKIP else [f"train.log_every={_skip(steps)}"]  # --quick: step `skip` is logged too
    argv = [str(BIN / "launcher"), "run", str(assets["recipe"]), f"train.max_steps={steps}", *every, *overrides, "--out", str(out)]
    env = {**os.environ, **({"PYTHONPATH": str(tree)} if tree else {})}
    watched = _watch(argv, env, out.with_name(out.name + "-probe"), _pad_id(assets), tree or ROOT)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    by_step = {r["step"]: r for r in records}
    skip = _skip(steps)
    # The recipe logs at the default log_every (10), as the Trainer here logs never: the steps logged
    # (the first, every 10th, the last) give the padding, and tokens_seen the rate from step `skip`.
    real = sum(r["tokens"] for r in records)
    pads = sum(r["pad_tokens"] for r in records)
    own = {
        "own tokens/s": (by_step[steps]["tokens_seen"] - by_step[skip]["tokens_seen"])
        / (by_step[steps]["elapsed"] - by_step[skip]["elapsed"]),
        "own padding": pads / (real + pads),
        "step-1 line s": watched.lines[1] - watched.t0,
        "loss": by_step[steps]["loss"],
    }
    return {**watched.figures(steps), **own}, watched.others("launcher run")


def run_trainer(assets: dict[str, Path], collator: str, out: Path, steps: int) -> tuple[dict[str, float], str]:
    argv = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(PROCS), __file__, "--hf-worker", collator]
    argv += ["--steps", str(steps), "--dir", str(out), "--model", str(assets["model"]), "--tokens", str(assets["tokens"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watched = _watch(argv, env, out.with_name(out.name + "-probe"), _pad_id(assets))
    ranks = [json.loads((out / f"steps-{r}.json").read_text()) for r in range(PROCS)]
    skip = _skip(steps)
    # each rank's (end time, real, all, loss) per step; a step ends when the slower rank ends it
    ends = [max(rk[i][0] for rk in ranks) for i in range(steps)]
    real = [sum(rk[i][1] for rk in ranks) for i in range(steps)]
    total = [sum(rk[i][2] for rk in ranks) for i in range(steps)]
    own = {
        "own tokens/s": sum(real[skip:]) / (ends[steps - 1] - ends[skip - 1]),
        "own padding": 1 - sum(real) / sum(total),
        "step-1 line s": ends[0] - watched.t0,
        "loss": ranks[0][-1][3],
    }
    return {**watched.figures(steps), **own}, watched.others("torchrun agent")


def _pad_id(assets: dict[str, Path]) -> int:
    return int(json.loads((assets["model"] / "config.json").read_text())["pad_token_id"])


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


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _ratio(runs: list[dict[str, float]], base: list[dict[str, float]] | None, key: str) -> str:
    """Per repeat against the baseline of the same repeat, then the median."""
    return f"{statistics.median(r[key] / b[key] for r, b in zip(runs, base, strict=False)):.2f}" if base else "-"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """The issue's figures (medians; ratios to the Trainer, padded, of the same repeat), then the
    clocks and each tool's own figures."""
    base = results.get(BASELINE)
    lines = [
        "| case | steady real tokens/s | x Trainer | per worker CPU s | x Trainer | first training forward s | x Trainer "
        "| padding | peak RSS MB: largest worker / everything else | tree PSS MB |",
        "|---|" + "---:|" * 9,
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {_median(runs, 'tokens/s'):,.0f} | {_ratio(runs, base, 'tokens/s')} "
            f"| {_median(runs, 'tokens/cpu s'):,.0f} | {_ratio(runs, base, 'tokens/cpu s')} "
            f"| {_median(runs, 'first forward s'):.2f} | {_ratio(runs, base, 'first forward s')} "
            f"| {100 * _median(runs, 'padding'):.1f} % | {_median(runs, 'rss worker (max)'):.0f} / {_median(runs, 'rss others'):.0f} "
            f"| {_median(runs, 'pss tree'):.0f} |"
        )
    lines += [
        "",
        "| case | first forward s | CPU s of the tree by then | x Trainer | step 1 end s (rank 0, in the worker) | x Trainer "
        "| step-1 line s (Trainer: callback) | x Trainer | own tokens/s | own padding | loss at the end |",
        "|---|" + "---:|" * 10,
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {_median(runs, 'first forward s'):.2f} | {_median(runs, 'cpu s to first forward'):.1f} "
            f"| {_ratio(runs, base, 'cpu s to first forward')} | {_median(runs, 'step 1 end s'):.2f} | {_ratio(runs, base, 'step 1 end s')} "
            f"| {_median(runs, 'step-1 line s'):.2f} | {_ratio(runs, base, 'step-1 line s')} "
            f"| {_median(runs, 'own tokens/s'):,.0f} | {100 * _median(runs, 'own padding'):.1f} % | {_median(runs, 'loss'):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke check: one repeat of 12 steps, no warm-up pass")
    parser.add_argument("--cases", nargs="*", default=[], help="case names, or substrings of them, to run (default: all)")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench_peers"))
    parser.add_argument(
        "--vs",
        default="",
        help="another checkout (a `git worktree`, with `launcher/kernels -> ../kernels/src` and `launcher/slurm -> "
        "../slurm/src` linked) whose launcher cases run in turn with this one's, as '<case> [vs]'",
    )
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
    vs = Path(args.vs).resolve() if args.vs else None
    if vs:
        cases = {**LAUNCHER_CASES, **{f"{n} [vs]": o for n, o in LAUNCHER_CASES.items()}, **TRAINER_CASES}
    # a whole case name picks that case alone ("HF Trainer, padded" without its bare twin); else substrings
    names = [n for n in cases if not args.cases or any(c == n if c in cases else c in n for c in args.cases)]
    if not names:
        raise SystemExit(f"--cases {args.cases} matches none of: {', '.join(cases)}")

    def once(name: str, out: Path, n: int) -> tuple[dict[str, float], str]:
        shutil.rmtree(out, ignore_errors=True)
        if name in LAUNCHER_CASES:
            return run_launcher(assets, LAUNCHER_CASES[name], out, n)
        if name.endswith(" [vs]"):
            return run_launcher(assets, LAUNCHER_CASES[name.removesuffix(" [vs]")], out, n, vs)
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
            r, others = once(name, work / "runs" / f"r{rep}-{i}", steps)
            results[name].append(r)
            print(
                f"repeat {rep + 1} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()) + f"; besides the workers: {others}",
                flush=True,
            )
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    skip = _skip(steps)
    print(
        f"\nmedians of {repeats}; {steps} steps; steady = steps {skip + 1}-{steps - 1}, forward to forward; real = non-pad tokens at the embedding\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
