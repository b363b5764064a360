"""A user's fresh machine: a run started by its launch.sh (torchrun, as on an 8-GPU box) reports the
versions it differs in, and `python` started in the checkout loads the export with the real
transformers, peft and Hugging Face `kernels` (which our kernels/ folder once shadowed, issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "cluster.gpus_per_node=1",
    "train.max_steps=2",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "train.eval_batches=0",
    "train.eval_exact_match=0",
]


def test_a_run_from_its_launch_script_then_its_export_loaded_from_the_checkout(tmp_path: Path, launcher, export) -> None:
    run = tmp_path / "run"
    launcher("prepare", "tiny-cpu.yaml", *SHORT, "--out", str(run))
    plan = json.loads((run / "plan.json").read_text())
    installed = plan["versions"]["transformers"]
    plan["versions"]["transformers"] = "5.0.0"  # as if planned on a login node with another release
    (run / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    done = subprocess.run(["bash", str(run / "launch.sh")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    told = [line for line in done.stderr.splitlines() if "where the run was planned" in line]
    assert len(told) == 1, done.stderr[-3000:]  # rank 0 only, one line for the one package
    assert told[0].endswith(
        f"warning: transformers {installed} here, 5.0.0 where the run was planned; plan and ranks should share one environment"
    )
    assert "outside the tested range" not in done.stderr

    out = tmp_path / "export"
    export(str(run), "--out", str(out))
    from transformers import AutoModelForCausalLM

    ids = [[1, 5, 9, 13, 2]]
    expected = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)).logits[0, -1, :8].tolist()
    code = (
        "import json, pathlib, sys\n"
        "import kernels, peft, torch\n"
        "import transformers.modeling_utils\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'site-packages' in pathlib.Path(kernels.__file__).parts, kernels.__file__\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"print(json.dumps(model(torch.tensor({ids})).logits[0, -1, :8].tolist()))\n"
    )
    # `python -c` in the project root: '' (the working directory) is first on sys.path, as for a user.
    started = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert started.returncode == 0, started.stderr[-3000:]
    assert json.loads(started.stdout.strip().splitlines()[-1]) == expected
