"""What a rank does before its first step: no tokenizer unless text is read, no scipy for transformers."""

from __future__ import annotations

import os
import subprocess
import sys

from launcher.runtime.model.build import LazyTokenizer, load_tokenizer
from launcher.runtime.model.tiny import ensure_tiny_model


def test_the_tokenizer_loads_at_its_first_use_and_answers_as_the_real_one() -> None:
    path = ensure_tiny_model()
    lazy = LazyTokenizer(path)
    assert lazy._tokenizer is None  # nothing read before generation asks
    real = load_tokenizer(path)
    assert lazy.eos_token_id == real.eos_token_id and lazy.pad_token_id == real.pad_token_id
    assert lazy.encode("3 + 4", add_special_tokens=False) == real.encode("3 + 4", add_special_tokens=False)
    assert lazy._tokenizer is not None


def test_a_rank_builds_a_model_without_importing_scipy() -> None:
    """transformers' object-detection losses import scipy.optimize; a rank hides it from them alone."""
    code = (
        "import sys\n"
        "from launcher.runtime.model.build import skip_unused_imports\n"
        "skip_unused_imports()\n"
        "from launcher.kernels.sdpa_varlen import register\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "register()\n"
        "AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, vocab_size=64))\n"
        "assert 'scipy' not in sys.modules, sorted(m for m in sys.modules if m.startswith('scipy'))[:3]\n"
        "from transformers.utils import is_scipy_available\n"
        "assert is_scipy_available(), 'the real answer is restored for everything else'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_rank_reads_its_planned_config_without_omegaconf_or_yaml(tmp_path) -> None:
    """plan.json's config, unchanged since `launcher plan` validated it, is built without the loader."""
    from launcher.config import load_config
    from launcher.plan import build_plan, write_run_dir

    plan = build_plan(load_config("tiny-cpu.yaml"), str(tmp_path / "run"))
    write_run_dir(plan)
    code = (
        "import sys\n"
        "from launcher.plan import Plan\n"
        f"cfg = Plan.load({plan.plan_path!r}).run_config\n"
        "assert cfg.train.max_steps, cfg.train\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('omegaconf', 'yaml') or m == 'launcher.config.load')\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rank_zeros_preload_imports_the_runtime_and_starts_no_thread(tmp_path) -> None:
    """launcher/zygote.py forks the other ranks after this: safe only with one thread and no CUDA."""
    from launcher.config import load_config
    from launcher.plan import build_plan, write_run_dir

    plan = build_plan(load_config("tiny-cpu.yaml", ["method.name=lora"]), str(tmp_path / "run"))
    write_run_dir(plan)
    code = (
        "import sys\n"
        "from launcher.runtime.__main__ import preload\n"
        "from launcher.zygote import threads\n"
        f"preload(['--plan', {plan.plan_path!r}])\n"
        "import torch\n"
        "assert threads() == 1, threads()\n"
        "assert not torch.cuda.is_initialized()\n"
        "wanted = {'torch.distributed.fsdp', 'transformers.models.llama.modeling_llama', 'peft', 'launcher.runtime.train.loop'}\n"
        "assert wanted <= set(sys.modules), wanted - set(sys.modules)\n"
        "assert 'deepspeed' not in sys.modules  # what this plan does not use\n"
    )
    # rank 0's environment: OMP_NUM_THREADS from the plan (more than 1 starts nothing at import), OpenBLAS's pool off
    env = {**os.environ, "OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
