"""What a person sees: rank 0's progress line or bar and metrics.jsonl (loss.png: launcher/plot.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from launcher.config.errors import ConfigError
from launcher.plan.resume import CheckpointError
from launcher.runfiles import open_append, replace_file
from launcher.runtime.train.trackers import Kind, Trackers


class Reporter:
    """Rank 0 reports; every other rank gets a Reporter that does nothing."""

    def __init__(
        self, run_dir: Path, enabled: bool, max_steps: int, start_step: int, trackers: Trackers | None = None, mfu_per_token_s: float = 0.0
    ) -> None:
        self.enabled = enabled
        self.mfu_per_token_s = mfu_per_token_s  # MFU of one token/s (model FLOPs / the GPUs' peak); 0: not shown (CPU)
        self.trackers = trackers  # train.report_to: fed every record written below
        self.max_steps = max_steps
        self.start = time.perf_counter()
        self.start_step = start_step
        self.path = run_dir / "metrics.jsonl"
        self._bar: Any = None
        self._file: TextIO | None = None
        if enabled:
            # A run from step 0 starts the file afresh; a resumed one continues it. Never through a
            # link planted at the name (the file it points to would be emptied, or grow).
            try:
                self._file = open_append(self.path, truncate=start_step == 0)
            except ConfigError as exc:
                raise CheckpointError(str(exc).removeprefix("error: ")) from None  # the ranks' one-line error
            if sys.stderr.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step's numbers; `record` is written if it is a log step."""
        if not self.enabled:
            return
        record = {**record, "peak_mem_gib": round(peak_memory_gib(), 3)}
        if self.mfu_per_token_s:
            record["mfu"] = round(record["tokens_per_s"] * self.mfu_per_token_s, 4)
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['peak_mem_gib']:.2f}G",
                **({"mfu": f"{record['mfu']:.0%}"} if "mfu" in record else {}),
            )
        else:
            done = record["step"] - self.start_step
            eta = (self.max_steps - record["step"]) * self.elapsed() / max(done, 1)
            mfu = f"  mfu {record['mfu']:.0%}" if "mfu" in record else ""
            if "rewards/accuracies" in record:  # task: preference
                mfu += f"  acc {record['rewards/accuracies']:.2f}  margin {record['rewards/margins']:.3f}"
            self.print(
                f"step {record['step']}/{self.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  tok/s {record['tokens_per_s']:.0f}{mfu}  mem {record['peak_mem_gib']:.2f}G  eta {_duration(eta)}"
            )
        self.write(record)

    def write(self, record: dict[str, Any], kind: Kind = "train") -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.trackers is not None:
            self.trackers.log(record, kind)

    def evaluation(self, metrics: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
        """An evaluation: a record in metrics.jsonl, one line on screen, and the latest one whole in
        eval.json with its predictions in eval_predictions.jsonl (so any metric can be recomputed)."""
        if not self.enabled:
            return
        self.write({**metrics, "elapsed": self.elapsed()}, "eval")
        shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        self.print("eval " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
        run_dir = self.path.parent
        replace_file(run_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        replace_file(run_dir / "eval_predictions.jsonl", "".join(json.dumps(record) + "\n" for record in predictions))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self.trackers is not None:
            self.trackers.close()


def peak_memory_gib() -> float:
    """This rank's peak: allocated GPU memory on CUDA, else the process's peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def mfu_per_token_s(estimate: dict[str, float], world_size: int, cuda: bool) -> float:
    """MFU contributed by one token per second (of the whole job): model FLOPs per token over every
    GPU's dense bf16 peak (cluster.gpu's, from the plan). 0 on CPU, where no peak is known."""
    peak = estimate.get("peak_tflops", 0.0) * 1e12 * world_size
    return estimate.get("model_flops_per_token", 0.0) / peak if cuda and peak else 0.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
