"""QLoRA's 4-bit base, built like every other model: meta device → method → shard → fill.

With methods.py, the only modules that import bitsandbytes (lazily, inside functions).

The skeleton is the model built on meta with transformers' own bitsandbytes replacement
(`replace_with_bnb_linear`, the modules from_pretrained would quantise: every linear layer of the
blocks, not the output embedding), each `Linear4bit` weight already in the packed shape and storage
dtype that `quantize_4bit` returns. FSDP2 therefore shards the packed data exactly as it would shard
a model from_pretrained had quantised. Filling streams the safetensors one tensor at a time
(model.load_weights with a hook): a quantised weight is read whole (one tensor transient), cast to
the model dtype as from_pretrained does, and each rank quantises only the packed rows it keeps; the
module keeps the whole (small) quant state, where `Linear4bit.forward` finds it after FSDP2 has
swapped the parameter object (bitsandbytes' fix_4bit_weight_quant_state_from_module). A rank never
holds more than its shard plus one tensor; the quantised bytes equal from_pretrained's
(tests/dist/test_qlora_load.py). DDP, single and ZeRO-2 take the same path without sharding (they
replicate the base anyway); ZeRO-3 is refused at validation (not built inside zero.Init).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.config.schema import QuantSection, RunConfig
from launcher.runtime.model.build import DTYPES

if TYPE_CHECKING:  # a type only: the model rooms sit below parallel/ (tests/unit/test_import_graph.py)
    from launcher.runtime.parallel.dist import DistInfo

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size, the one from_pretrained uses (BitsAndBytesConfig has no key for it)
# Elements quantised at once: bitsandbytes' CPU kernel holds about 16 bytes per element while it
# works (fp32 copies), a transient of 16x the packed size if a whole weight went in at once.
CHUNK = 1 << 18


def bnb_config(quant: QuantSection) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[quant.quant_storage_dtype],
    )


def quantize_skeleton(model: nn.Module, quant: QuantSection, dtype: torch.dtype) -> int:
    """Swap the linear layers from_pretrained would quantise for meta `Linear4bit`s whose weight is
    already packed (shape and dtype of quantize_4bit's output); returns how many."""
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    config = bnb_config(quant)
    skip = {*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as inside from_pretrained: a new layer's bias in the model dtype
    try:
        replace_with_bnb_linear(model, modules_to_not_convert=sorted(skip), quantization_config=config)
    finally:
        torch.set_default_dtype(previous)
    storage = DTYPES[quant.quant_storage_dtype]
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        full = torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
        # The op itself on meta: the packed shape only. (bnb.functional.quantize_4bit would cache its
        # double-quant code map on the meta device and fail on every real tensor afterwards.)
        packed, _ = torch.ops.bitsandbytes.quantize_4bit.default(full, BLOCKSIZE, quant.quant_type, storage)
        module.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=quant.double_quant,
            quant_type=quant.quant_type,
            quant_storage=storage,
            module=module,
            bnb_quantized=True,  # `.to(device)` must not quantise the (empty) data again
        )
        count += 1
    model.is_loaded_in_4bit = True  # type: ignore[assignment]  # peft then wraps these layers with its bitsandbytes LoRA layer
    model.config.quantization_config = config  # type: ignore[union-attr]  # as from_pretrained records it
    return count


def _kept_rows(target: torch.Tensor) -> tuple[int, int]:
    """The rows of the packed weight this rank keeps: its DTensor shard's, or all of them."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return 0, target.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return offset[0], offset[0] + shape[0]


def quantize_kept(weight: torch.Tensor, quant: QuantSection, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' quantize_4bit of `weight`, computed only for the rows of packed data this rank
    keeps (`target`, a DTensor shard) and CHUNK elements at a time; the other ranks' absmax comes
    from one all-reduce (MAX: absmax >= 0, blocks not computed here are 0), then the double
    quantisation of the whole absmax runs on every rank as quantize_4bit runs it. Rows outside the
    shard are left 0: copy_full_into keeps only the shard. Blocks are independent, so the bytes
    equal quantize_4bit's (tests/dist/test_qlora_load.py); a shard boundary inside a block (not
    at LLM shapes) quantises the whole tensor instead."""
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    storage = DTYPES[quant.quant_storage_dtype]
    flat = weight.reshape(-1)
    n, per_row = flat.numel(), 2 * storage.itemsize  # 4-bit codes per element of the storage dtype
    lo, hi = _kept_rows(target)
    start, stop = lo * per_row, min(hi * per_row, n)
    if start % BLOCKSIZE or (stop % BLOCKSIZE and stop != n):
        start, stop = 0, n
    packed = torch.zeros((n + 1) // per_row, 1, dtype=storage, device=weight.device)
    absmax = torch.zeros(-(n // -BLOCKSIZE), dtype=torch.float32, device=weight.device)
    for begin in range(start, stop, CHUNK):
        end = min(begin + CHUNK, stop)
        codes, scales = torch.ops.bitsandbytes.quantize_4bit.default(flat[begin:end], BLOCKSIZE, quant.quant_type, storage)
        packed[begin // per_row : begin // per_row + codes.shape[0]] = codes
        absmax[begin // BLOCKSIZE : begin // BLOCKSIZE + scales.numel()] = scales
    if isinstance(target, DTensor) and dist.is_initialized():
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
    code = bnb.functional.get_4bit_type(quant.quant_type, device=weight.device)
    common = {"shape": weight.shape, "dtype": weight.dtype, "blocksize": BLOCKSIZE, "code": code, "quant_type": quant.quant_type}
    if not quant.double_quant:
        return packed, bnb.functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    nested, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnb.functional.QuantState(absmax=nested, offset=offset, state2=state2, **common)


def quantizer(
    quant: QuantSection, dtype: torch.dtype, device: torch.device, state_device: torch.device | None = None
) -> Callable[[nn.Module, str, torch.Tensor], torch.Tensor]:
    """The load_weights hook: a 4-bit layer's full checkpoint weight → its packed data (the rank's
    rows filled; what its shard is cut from); the layer keeps the quant state. Other tensors pass through."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    def convert(owner: nn.Module, attr: str, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(owner, bnb.nn.Linear4bit) or attr != "weight":
            return tensor
        weight = tensor.to(device=device, dtype=dtype)  # from_pretrained casts to the model dtype first
        if issubclass(getattr(owner, "source_cls", nn.Linear), Conv1D):
            weight = weight.T  # GPT-2 stores [in, out]; bitsandbytes quantises [out, in]
        packed, state = quantize_kept(weight.contiguous(), quant, owner.weight)
        if state_device is not None and state_device != device:  # CPU offload: the packed data is on the
            state.to(state_device)  # host (in place), FSDP2 gathers it to the GPU, where the kernels read the state
        owner.quant_state = state
        if isinstance(owner.weight, bnb.nn.Params4bit):  # unsharded (DDP, single): the parameter carries it too
            owner.weight.quant_state = state
        return packed

    return convert


def build_qlora(
    path: Path,
    cfg: RunConfig,
    info: DistInfo,
    attn_implementation: str,
    shard: Callable[[nn.Module], nn.Module],
    param_device: torch.device | None = None,
) -> nn.Module:
    """4-bit base + LoRA adapters, never whole on a rank: meta skeleton, peft, checkpointing,
    `shard` (FSDP2, or nothing), materialise on `param_device` (default the rank's device), fill,
    then the adapters."""
    from launcher.runtime.model.blocks import apply_checkpointing
    from launcher.runtime.model.build import WeightMap, build_on_meta, load_weights, materialize
    from launcher.runtime.model.methods import init_adapters, keep_4bit_layout, wrap_with_peft

    dtype = DTYPES[cfg.model.dtype]
    model = build_on_meta(path, cfg.model, attn_implementation, dtype)
    quantize_skeleton(model, cfg.method.quant, dtype)
    weights = WeightMap.of(model, cfg.task)  # before peft and sharding: keys → modules
    # What peft's prepare_model_for_kbit_training does, without its fp32 upcast of every bf16
    # weight: that is a full-size fp32 copy of the embeddings and lm_head on every GPU (about 45 GB
    # transient at 70B), and the compute runs in the compute dtype anyway (FSDP2's param dtype,
    # autocast elsewhere; HF norms upcast their activations themselves).
    model.requires_grad_(False)
    if cfg.train.activation_checkpointing:
        model.enable_input_require_grads()  # type: ignore[operator]  # checkpointed blocks need an input that requires grad
        apply_checkpointing(model, cfg.train.checkpointing)
    adapted = wrap_with_peft(model, cfg.method)
    adapted = shard(adapted)
    home = param_device or info.device  # the host under FSDP2's CPU offload (parallel/native.py parameter_device)
    materialize(adapted, home, buffer_device=info.device)
    load_weights(adapted, weights, path, cfg.run.seed, convert=quantizer(cfg.method.quant, dtype, home, state_device=info.device))
    keep_4bit_layout(adapted)
    init_adapters(adapted, cfg.run.seed)  # the same adapters on every rank, whatever peft drew
    return adapted
