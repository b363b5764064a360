"""The methods: `apply_method` (freeze, or peft's LoRA / prompt tuning; QLoRA's adapters too), and the
adapters' own set-up, saving and merging.

With qlora.py (the 4-bit base), the only modules that import peft or bitsandbytes (lazily, inside
functions).

- LoRA and prompt tuning wrap a model that is still on the meta device (backends.py then shards,
  materialises and loads the base weights), so `init_adapters` must fill the adapter weights
  afterwards: each full tensor comes from a generator seeded by (run seed, parameter name), and a
  rank keeps only its shard. Every rank and every world size therefore starts from the same
  adapters, and 1-rank and 2-rank runs give the same losses.
- Trainable adapter weights are fp32 masters whatever the frozen base's dtype; FSDP2 accepts
  parameters of several dtypes in one unit (it all-gathers in the mixed-precision param dtype).
- QLoRA builds its 4-bit base the same way (meta, LoRA, shard, then quantise while filling each
  rank's shard): qlora.py.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config.schema import LoraSection, MethodSection, RunConfig
from launcher.runtime.model.build import copy_full_into, final_norms, find_blocks, head_modules
from launcher.runtime.model.conversions import Conversions
from launcher.runtime.model.files import ModelError

ADAPTER_MARKERS = ("lora_", "prompt_encoder")

# peft imports bitsandbytes, whose CPU backend warns on every rank (on AVX512-BF16 CPUs) that the
# optional `kernels` package is missing: it only speeds up the 4-bit inference path we turn off.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "preference": "CAUSAL_LM", "classification": None}


def lora_config(lora: LoraSection, task: str = "causal_lm", heads: list[str] | None = None) -> Any:
    """peft's LoraConfig; `heads` (a classifier's head modules) are trained in full, never adapted."""
    from peft import LoraConfig

    # "all-linear": every nn.Linear (and GPT-2's Conv1D, with fan_in_fan_out) of the blocks; peft
    # leaves out the output layer. A classifier's new head is trained in full beside the adapters
    # (model.apply_method marks it), not through peft's task wrappers, so checkpoint names stay the model's.
    targets: str | list[str] = "all-linear" if "all-linear" in lora.target_modules else list(lora.target_modules)
    return LoraConfig(
        task_type=PEFT_TASKS[task],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        exclude_modules=heads or None,
        bias="none",
    )


def wrap_with_peft(module: nn.Module, method: MethodSection, task: str = "causal_lm") -> nn.Module:
    """Add LoRA or prompt-tuning adapters; only they stay trainable, as fp32 masters."""
    from peft import PromptTuningConfig, get_peft_model

    match method.name:
        case "lora" | "qlora":
            names = {id(m): n for n, m in module.named_modules()}
            heads = [names[id(h)] for h in head_modules(module, pooler=False)] if task == "classification" else None
            config = lora_config(method.lora, task, heads)
        case "prompt_tuning":
            config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.prompt_tuning.num_virtual_tokens)
        case _:
            raise AssertionError(method.name)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per rank).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(module, config)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        if is_adapter(name) and param.dtype != torch.float32:
            param.data = param.data.float()
    if method.name == "prompt_tuning":
        _align_prompt_tuning_io(model, method.prompt_tuning.num_virtual_tokens)
    return model


def _align_prompt_tuning_io(model: nn.Module, num_virtual_tokens: int) -> None:
    """Make a prompt-tuned model take and return what the loop gives any causal LM.

    peft prepends the virtual tokens to the input embeddings: it cannot extend the loop's 4-D
    document mask and ignores position ids, and its logits start with one row per virtual token.
    Prompt tuning runs unpacked (validate.py), so each row is one document with its padding at the
    end, and plain causal attention over [virtual tokens, row] is exact for every real token.
    """

    def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, "attention_mask": None, "position_ids": None}

    def after(_module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> Any:
        output.logits = output.logits[:, num_virtual_tokens:]
        return output

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


def _canonical(name: str) -> str:
    """The parameter's name without wrapper prefixes, so the seed does not depend on wrapping."""
    for prefix in ("module.", "_orig_mod."):
        name = name.removeprefix(prefix)
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Initialise every adapter weight as peft does, identically on every rank and world size.

    LoRA A: kaiming-uniform (a=sqrt(5)), LoRA B: zeros (embedding LoRA: A zeros, B normal);
    prompt-tuning embeddings: normal(0, 1) like a fresh nn.Embedding. The full tensor is drawn
    from a generator seeded by (seed, name), then each rank keeps its shard (DTensor) or all of it.
    """
    for name, param in model.named_parameters():
        if not is_adapter(name):
            continue
        key = _canonical(name)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        full = torch.empty(tuple(param.shape), dtype=torch.float32)
        if "lora_embedding_A" in key:
            full.zero_()
        elif "lora_embedding_B" in key or "prompt_encoder" in key:
            full.normal_(generator=generator)
        elif "lora_A" in key:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        elif "lora_B" in key:
            full.zero_()
        else:
            raise RuntimeError(f"{name}: an adapter weight this launcher does not know how to initialise")
        copy_full_into(param, full)


def keep_4bit_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repack of 4-bit weights.

    On AVX512-BF16 CPUs it repacks the weight in place on the first no-grad forward (our eval): that
    fails when in_features is not a multiple of the block size (the tiny model's 352), and under
    FSDP2 the repacked quant state would no longer match the weight all-gathered next. Keep the one
    training layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]


def _checkpoint_name(name: str) -> str:
    """A checkpoint key (`model.` + the training model's name) → the name inside the PeftModel."""
    return re.sub(r"\.default(?=\.|$)", "", name.removeprefix("model."))


def write_adapter(read: Any, cfg: RunConfig, out: Path, heads: list[str] | None = None) -> int:
    """Write the trained adapter alone in peft's format (adapter_config.json + adapter_model.safetensors);
    a classifier's head (trained in full) goes with it as peft's `modules_to_save`."""
    from peft import PromptTuningConfig
    from safetensors.torch import save_file

    from launcher.runtime.model.files import model_dir

    tensors: dict[str, torch.Tensor] = {}
    head_prefixes = tuple(f"base_model.model.{h}." for h in heads or [])
    for name, tensor in read.items():
        if head_prefixes and _checkpoint_name(name).startswith(head_prefixes):
            tensors[_checkpoint_name(name)] = tensor.float().contiguous()
            continue
        if not is_adapter(name):
            continue
        key = _checkpoint_name(name)
        # peft saves a prompt encoder's embedding under one name, whatever the adapter is called.
        key = "prompt_embeddings" if key.startswith("prompt_encoder.") else key
        tensors[key] = tensor.float().contiguous()
    if not tensors:
        raise ModelError(f"method.name {cfg.method.name}: the checkpoint holds no adapter weights")
    method = cfg.method
    if method.name == "prompt_tuning":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.prompt_tuning.num_virtual_tokens)
    else:
        config = lora_config(method.lora, cfg.task, heads)
    if heads:
        config.task_type = "SEQ_CLS"  # peft then trains `classifier` / `score` in full itself; name any other head
        config.modules_to_save = [n for n in (h.rpartition(".")[2] for h in heads) if n not in ("classifier", "score")] or None
    config.base_model_name_or_path = str(model_dir(cfg.model))
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(tensors)


def merged_tensors(
    read: Any, cfg: RunConfig, base: Path, dtype: torch.dtype, heads: list[str] | None = None, expected: dict[str, Any] | None = None
) -> Any:
    """The base model's tensors (from its own safetensors) with W + (alpha / r) B A merged in.

    Frozen base weights are read from the original files rather than the checkpoint, so a QLoRA
    adapter merges into the unquantised weights; they are read as from_pretrained reads them,
    through transformers' conversions (GPT-NeoX's `embed_out` is `lm_head`, a Mixture-of-Experts
    base's per-expert weights are fused, one layer's experts at a time), so the names are the
    model's: the adapters' and `expected`'s (export writes save_pretrained's layout back). GPT-2's
    Conv1D stores W transposed (peft's fan_in_fan_out): found by module type on a meta copy of the
    model, not by shape. For a classifier, `expected` is the exported model's keys (the base's
    lm_head is left out) and the trained head comes from the checkpoint. Yields (model name, tensor).
    """
    from safetensors import safe_open
    from transformers.pytorch_utils import Conv1D

    from launcher.runtime.model.build import build_on_meta

    meta = build_on_meta(base, cfg.model, "sdpa", torch.float32, cfg.task, None if expected is None else ["_"] * 2)
    transposed = {f"{name}.weight" for name, module in meta.named_modules() if isinstance(module, Conv1D)}
    lora = cfg.method.lora
    scale = lora.alpha / lora.r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: list[tuple[str, torch.Tensor]] = []
    head_prefixes = tuple(f"{h}." for h in heads or [])
    for name, tensor in read.items():
        inner = _checkpoint_name(name).removeprefix("base_model.model.")
        if head_prefixes and inner.startswith(head_prefixes):
            head_tensors.append((inner, tensor))
        if "lora_" not in name:
            continue
        module, _, rest = inner.partition(".lora_")
        pairs.setdefault(f"{module}.weight", {})[rest.split(".")[0]] = tensor.float()  # A, B, embedding_A, embedding_B
    prefixes = sorted({k.split(".")[0] for k in (expected or {})})
    merged = 0

    def exported_name(key: str) -> str:  # a base saved without its prefix (BertModel) → the classifier's name; "": not exported
        if expected is None:
            return key
        return next((k for k in (key, *(f"{p}.{key}" for p in prefixes)) if k in expected), "")

    def merge(key: str, tensor: torch.Tensor) -> torch.Tensor:
        nonlocal merged
        pair = pairs.get(key)
        if pair is None:
            return tensor
        if "A" in pair:
            delta = pair["B"] @ pair["A"]
            delta = delta.T if key in transposed else delta
        else:  # an embedding's LoRA: A is [r, vocab], B is [dim, r]
            delta = (pair["embedding_B"] @ pair["embedding_A"]).T
        merged += 1
        return (tensor.float() + scale * delta).to(dtype)

    files = sorted(base.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    conversions = Conversions(meta)
    plain, groups = conversions.groups(list(where))
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for stored in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                key = exported_name(plain[stored]) if stored in plain else ""
                if key:
                    yield key, merge(key, handle.get_tensor(stored))

    def read_base(stored: str) -> torch.Tensor:
        with safe_open(str(where[stored]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(stored)

    for target, group in groups.items():  # tensors transformers merges on load (one layer's experts at a time)
        for converted, tensor in conversions.convert(target, group, read_base).items():
            if key := exported_name(converted):
                yield key, merge(key, tensor)
    yield from head_tensors
    if merged != len(pairs):
        raise ModelError(f"merged {merged} of {len(pairs)} LoRA pairs into {base}; the base does not match the checkpoint")


def apply_method(module: nn.Module, method: MethodSection, layer_class: str = "", task: str = "causal_lm") -> nn.Module:
    """Freeze what the method does not train; wrap with peft adapters for LoRA / prompt tuning."""
    match method.name:
        case "full":
            return module
        case "freeze":
            keep: list[nn.Module] = []
            blocks = find_blocks(module, layer_class)
            count = method.freeze.trainable_last_layers
            keep += blocks[len(blocks) - count :] if count else []
            if method.freeze.train_head and task == "classification":
                keep += head_modules(module)  # the classifier (and a pooler): "head only" with 0 blocks
            elif method.freeze.train_head:
                keep += [m for m in [module.get_output_embeddings()] if m is not None] + final_norms(module, blocks)  # type: ignore[operator]
            if method.freeze.train_embeddings:
                keep.append(module.get_input_embeddings())  # type: ignore[operator]
            module.requires_grad_(False)
            for kept in keep:
                kept.requires_grad_(True)
            return module
        case "lora" | "qlora" | "prompt_tuning":
            wrapped = wrap_with_peft(module, method, task)
            if task == "classification":  # the new head is trained with the adapters
                for head in head_modules(wrapped, pooler=False):
                    head.requires_grad_(True)
                    for param in head.parameters():
                        param.data = param.data.float()
            return wrapped
    raise AssertionError(method.name)
