"""Build the model and tokenizer for a plan: meta device → method (freeze / LoRA) → shard → load.

Full, freeze and LoRA models are built on the meta device, sharded, then materialised and filled
from the checkpoint's safetensors (each rank reads its own shard from the memory-mapped file), so
no rank ever holds a full fp32 copy it does not need. QLoRA loads through bitsandbytes and is
sharded after quantisation (adapters.py: the only module that imports peft and bitsandbytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config.resolve import TINY_MODEL
from launcher.config.schema import MethodSection, ModelSection
from launcher.runtime.tiny import ensure_tiny_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelError(Exception):
    """A model that cannot be found or loaded; one line for the user."""


def model_dir(model: ModelSection) -> Path:
    """The local directory holding config, weights and tokenizer (built for tiny-llama)."""
    if model.name_or_path == TINY_MODEL:
        return ensure_tiny_model()
    path = Path(model.name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: {model.name_or_path} is not a local directory and could not be fetched "
            f"({type(exc).__name__}); download it first (huggingface-cli download) and point at the directory"
        ) from None


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_on_meta(path: Path, model: ModelSection, attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    config.use_cache = False  # training: no KV cache (and packed batches need it off)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=model.trust_remote_code
        )
    return built


def apply_method(module: nn.Module, method: MethodSection, num_layers: int) -> nn.Module:
    """Freeze what the method does not train; wrap with peft adapters for LoRA / prompt tuning."""
    match method.name:
        case "full":
            return module
        case "freeze":
            keep = {f"layers.{i}." for i in range(num_layers - method.freeze.trainable_last_layers, num_layers)}
            for name, param in module.named_parameters():
                head = method.freeze.train_head and (name.startswith("lm_head") or name.endswith("model.norm.weight"))
                embed = method.freeze.train_embeddings and "embed_tokens" in name
                param.requires_grad_(head or embed or any(k in name for k in keep))
            return module
        case "lora" | "qlora" | "prompt_tuning":
            from launcher.runtime.adapters import wrap_with_peft

            return wrap_with_peft(module, method)
    raise AssertionError(method.name)


def load_weights(module: nn.Module, path: Path, device: torch.device) -> None:
    """Fill a sharded (or plain) model from the directory's safetensors, one tensor at a time.

    Each rank reads each tensor from the memory-mapped file and keeps only its own shard, so memory
    stays at one full tensor plus the rank's shards.
    """
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights found")
    targets: dict[str, torch.Tensor] = dict(module.named_parameters())
    targets.update({name: buf for name, buf in module.named_buffers() if name.rpartition(".")[2] in _persistent(module, name)})
    filled: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = _match_key(key, targets)
                if name is not None:
                    copy_full_into(targets[name], handle.get_tensor(key))
                    filled.add(name)
    missing = [n for n in targets if n not in filled and "lora_" not in n and "prompt_encoder" not in n]
    if missing:
        raise ModelError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    reinit_buffers(module, device)


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard if it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            shard = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(full.to(target.dtype))


def _persistent(module: nn.Module, name: str) -> set[str]:
    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    return set(owner._buffers) - set(getattr(owner, "_non_persistent_buffers_set", set()))


def _match_key(key: str, expected: dict[str, Any]) -> str | None:
    """Map a Hugging Face checkpoint key onto the (possibly peft-wrapped) model's name."""
    wrapped = f"base_model.model.{key}"  # LoRA: PeftModel → LoraModel → the model
    prompted = f"base_model.{key}"  # prompt tuning: PeftModel → the model
    for candidate in (
        key,
        wrapped,
        prompted,
        key.replace(".weight", ".base_layer.weight"),
        wrapped.replace(".weight", ".base_layer.weight"),
    ):
        if candidate in expected:
            return candidate
    return None


def reinit_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild them after to_empty."""
    for sub in module.modules():
        if hasattr(sub, "inv_freq") and hasattr(sub, "config"):
            fresh = type(sub)(sub.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(sub, name, buffer.to(device))


def initial_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())
