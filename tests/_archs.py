"""Tiny random models of several architecture families, built offline from transformers config
classes and cached as ordinary Hugging Face model directories (with the tiny tokenizer), one build
per architecture for the whole suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

ARCH_VERSION = "v1"
# Shapes differ on purpose: biases (Qwen2), tied embeddings + Conv1D (GPT-2), explicit head_dim and
# scaled embeddings (Gemma), sliding-window config (Mistral), an encoder (BERT), a checkpoint whose
# names transformers converts on load (GPT-NeoX).
SHAPES = {
    "llama": (
        "LlamaConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "qwen2": (
        "Qwen2Config",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "mistral": (
        "MistralConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "gemma": (
        "GemmaConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
        },
    ),
    # GPT-NeoX: its checkpoint names the head embed_out (transformers renames it to lm_head on load)
    "gpt_neox": (
        "GPTNeoXConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512},
    ),
    # Mixture-of-Experts: saved per expert (block_sparse_moe.experts.N.w1/w2/w3), fused by transformers on load
    "mixtral": (
        "MixtralConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "bert": (
        "BertConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512},
    ),
}


def model_dir_once(path: Path, version: str, fill: Callable[[Path], None]) -> Path:
    """The model directory `path`, built once for the suite under a file lock: the tiny tokenizer
    is copied into a temporary directory, `fill(tmp)` writes the config and weights there, then
    COMPLETE and an atomic rename, so a killed build never leaves a half directory behind."""
    from launcher.runtime.model.tiny import ensure_tiny_model

    if (path / "COMPLETE").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "COMPLETE").exists():
            return path
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for file in ensure_tiny_model().iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(file, tmp / file.name)
        fill(tmp)
        (tmp / "COMPLETE").write_text(version + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def tiny_arch(name: str) -> Path:
    """The directory of the tiny `name` model (built once, under a file lock)."""
    from launcher.runtime.model.tiny import cache_dir

    def fill(tmp: Path) -> None:
        import torch
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
        class_name, shape = SHAPES[name]
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        config = getattr(transformers, class_name)(vocab_size=1024, **shape, **ids)
        torch.manual_seed(0)
        auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
        model = auto.from_config(config).to(torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)

    return model_dir_once(cache_dir() / "archs" / f"{name}-{ARCH_VERSION}", ARCH_VERSION, fill)
