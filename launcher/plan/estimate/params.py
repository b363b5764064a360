"""Parameter counts from a resolved ModelSection, per architecture family (no torch).

Modelled exactly (tests/unit/test_estimate.py holds them to `sum(p.numel())` of the transformers
model): llama, mistral, qwen2 (q/k/v biases), gemma (explicit head_dim, tied head), gpt2 (biases,
LayerNorm, fused Conv1D attention, learned positions, 4x MLP without a gate), bert (the base
encoder with its pooler), and the Mixture-of-Experts mixtral and qwen2_moe (a router, every expert's
gated MLP, Qwen2-MoE's shared expert and its gate). Any other model type is counted as Llama-shaped
(with its experts, when ModelSection has them): an approximation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launcher.config.schema import MethodSection, ModelSection


@dataclass(frozen=True)
class Family:
    gated_mlp: bool  # gate/up/down (SwiGLU, GeGLU) rather than fc/proj
    layer_norm: bool  # LayerNorm with a bias rather than RMSNorm
    biases: str  # "none" | "qkv" (Qwen2) | "all" (GPT-2, BERT)
    learned_positions: bool  # a [positions, hidden] table (GPT-2, BERT)
    encoder: bool = False  # BERT: token types, embedding LayerNorm, pooler, no LM head
    mlp_saved: int = 4  # tensors of width intermediate saved for backward per token (activation function)
    exact: bool = True


LLAMA = Family(gated_mlp=True, layer_norm=False, biases="none", learned_positions=False)
FAMILIES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "gemma": LLAMA,
    "qwen2": Family(gated_mlp=True, layer_norm=False, biases="qkv", learned_positions=False),
    "mixtral": LLAMA,
    "qwen2_moe": Family(gated_mlp=True, layer_norm=False, biases="qkv", learned_positions=False),
    # gelu_new is written out in Python ops: its input and three intermediates are saved, plus c_proj's input.
    "gpt2": Family(gated_mlp=False, layer_norm=True, biases="all", learned_positions=True, mlp_saved=5),
    "bert": Family(gated_mlp=False, layer_norm=True, biases="all", learned_positions=True, encoder=True, mlp_saved=2),
}
DEFAULT_POSITIONS = {"gpt2": 1024, "bert": 512}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def family_of(model: ModelSection) -> Family:
    known = FAMILIES.get(model.architecture or "llama")
    return known if known is not None else Family(**{**LLAMA.__dict__, "exact": False})


@dataclass(frozen=True)
class ParamCounts:
    total: int
    layers: int
    per_layer: int  # one block
    layer_linear: int  # the block's linear weights (what QLoRA quantises)
    embeddings: int  # token (+ position, token type) tables
    head: int  # the LM head's own weight: 0 when tied or for an encoder / classifier
    final_norm: int  # final norm (+ BERT's embedding norm and pooler)
    lora: int  # adapter parameters for the configured targets, all layers
    lora_modules: tuple[tuple[int, int, str], ...]  # (in, out, input) of each LoRA-wrapped linear in one block
    idle_layer_linear: int = 0  # MoE: a block's expert weights a token does not use (not routed to it)

    @property
    def linear(self) -> int:
        return self.layer_linear * self.layers

    @property
    def active(self) -> int:
        """Parameters one token's forward uses: all of them, less the experts it is not routed to."""
        return self.total - self.idle_layer_linear * self.layers

    @property
    def active_linear(self) -> int:
        return (self.layer_linear - self.idle_layer_linear) * self.layers

    @property
    def root(self) -> int:
        """What FSDP2's root unit holds: everything outside the blocks."""
        return self.embeddings + self.head + self.final_norm


def shapes(model: ModelSection) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, intermediate, vocab, q width, kv width), checked filled in."""
    h, layers, inter, vocab = model.hidden_size, model.num_layers, model.intermediate_size, model.vocab_size
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads or model.num_attention_heads
    assert h and layers and inter and vocab and heads and kv_heads, "resolve() first"
    head_dim = model.head_dim or h // heads
    return h, layers, inter, vocab, heads * head_dim, kv_heads * head_dim


def mlp_width(model: ModelSection) -> int:
    """The MLP width one token's activations have: the intermediate size, or for a Mixture-of-Experts
    block the widths of the experts it is routed to and of a shared expert."""
    _, _, inter, _, _, _ = shapes(model)
    if not model.num_experts:
        return inter
    return (model.experts_per_token or 1) * (model.expert_intermediate_size or inter) + (model.shared_expert_intermediate_size or 0)


def learned_positions(model: ModelSection) -> int:
    """Rows of a learned position table: from the model's config.json when it is on disk, else the family default."""
    if not family_of(model).learned_positions:
        return 0
    from launcher.config.resolve import model_config_file

    path = model_config_file(model.name_or_path)
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(raw.get(key), int):
                return int(raw[key])
    return DEFAULT_POSITIONS.get(model.architecture, 1024)


def block_linears(model: ModelSection) -> dict[str, list[tuple[int, int, str]]]:
    """Module name -> (in, out, input) of the linears in one block, as peft names them (GPT-2's c_proj
    twice); `input` names the tensor they read: norm1, attention (its output), norm2, mlp (the activation)."""
    h, _, inter, _, q, kv = shapes(model)
    fam = family_of(model)
    if model.architecture == "gpt2":
        return {"c_attn": [(h, q + 2 * kv, "norm1")], "c_proj": [(q, h, "attention"), (inter, h, "mlp")], "c_fc": [(h, inter, "norm2")]}
    if fam.encoder:
        attention = {"query": [(h, q, "norm1")], "key": [(h, kv, "norm1")], "value": [(h, kv, "norm1")]}
        return {**attention, "dense": [(q, h, "attention"), (h, inter, "norm2"), (inter, h, "mlp")]}
    mlp = {"gate_proj": [(h, inter, "norm2")], "up_proj": [(h, inter, "norm2")], "down_proj": [(inter, h, "mlp")]}
    if not fam.gated_mlp:
        mlp = {"up_proj": [(h, inter, "norm2")], "down_proj": [(inter, h, "mlp")]}
    attention = {"q_proj": [(h, q, "norm1")], "k_proj": [(h, kv, "norm1")], "v_proj": [(h, kv, "norm1")], "o_proj": [(q, h, "attention")]}
    return {**attention, **mlp}


def count_params(model: ModelSection, method: MethodSection, task: str = "causal_lm", positions: int | None = None) -> ParamCounts:
    h, layers, inter, vocab, q, kv = shapes(model)
    fam = family_of(model)
    linears = block_linears(model)
    layer_linear = sum(i * o for pairs in linears.values() for i, o, _ in pairs)
    biases = {"none": 0, "qkv": q + 2 * kv, "all": q + 2 * kv + h + inter + h}[fam.biases]
    norm = 2 * h if fam.layer_norm else h
    per_layer = layer_linear + biases + 2 * norm
    rows = 0 if not fam.learned_positions else positions if positions is not None else learned_positions(model)
    embeddings = vocab * h + rows * h + (2 * h if fam.encoder else 0)
    final_norm = (norm + h * h + h) if fam.encoder else norm  # BERT: embedding LayerNorm + pooler, no final norm
    head = 0 if (model.tie_word_embeddings or fam.encoder or task == "classification") else vocab * h  # preference: an LM head
    wanted = set(linears) if "all-linear" in method.lora.target_modules else set(method.lora.target_modules) & set(linears)
    lora_modules = tuple(pair for name in sorted(wanted) for pair in linears[name])
    lora = layers * sum(method.lora.r * (i + o) for i, o, _ in lora_modules)
    idle = 0
    if model.num_experts:  # the dense MLP above becomes a router, the experts (gated) and a shared expert
        experts, routed = model.num_experts, model.experts_per_token or 1
        width, shared = model.expert_intermediate_size or inter, model.shared_expert_intermediate_size or 0
        dense_mlp = sum(i * o for name in ("gate_proj", "up_proj", "down_proj") for i, o, _ in linears.get(name, []))
        expert = 3 * h * width
        layer_linear += experts * expert + 3 * h * shared - dense_mlp
        per_layer += experts * expert + 3 * h * shared - dense_mlp + h * experts + (h if shared else 0)
        idle = (experts - routed) * expert
    total = layers * per_layer + embeddings + final_norm + head
    return ParamCounts(total, layers, per_layer, layer_linear, embeddings, head, final_norm, lora, lora_modules, idle)


def trainable_params(counts: ParamCounts, model: ModelSection, method: MethodSection) -> int:
    """Parameters the optimizer updates under the method."""
    match method.name:
        case "full":
            return counts.total
        case "lora" | "qlora":
            return counts.lora
        case "prompt_tuning":
            return method.prompt_tuning.num_virtual_tokens * (model.hidden_size or 0)
        case "freeze":
            f = method.freeze
            head = (counts.head or (model.vocab_size or 0) * (model.hidden_size or 0)) + counts.final_norm if f.train_head else 0
            embed = counts.embeddings if f.train_embeddings else 0
            return min(f.trainable_last_layers, counts.layers) * counts.per_layer + head + embed
    raise AssertionError(method.name)
