"""A model's architecture read from its own files, without importing torch or transformers.

`launcher plan` must stay instant and torch-free, yet every architecture names its shapes its own
way (GPT-2: `n_embd`, `n_layer`, `n_head`; Llama: `hidden_size`, ...). transformers resolves those
names through each config class's `attribute_map` and fills absent keys from the class defaults.
We read the same two things from transformers' installed source (`configuration_<type>.py`, parsed
with `ast`, never imported), and the block class FSDP2 shards from the modeling file's
`_no_split_modules`. The runtime re-reads the real config with `AutoConfig` and checks the numbers
agree (runtime/model/build.py), so this reader cannot drift silently.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from launcher.config.errors import ConfigError, Problem

# Our ModelSection field -> the canonical transformers config attribute.
CANONICAL = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
    "head_dim": "head_dim",
}
# Feed-forward widths under other names (GPT-2's MLP uses 4 x hidden when `n_inner` is null).
_FFN_ALIASES = ("n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")
# Model types that are encoders: no causal LM head, classification only.
ENCODERS = frozenset({"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "xlm-roberta", "modernbert"})


@dataclass(frozen=True)
class Architecture:
    model_type: str
    numbers: dict[str, int | bool | None]  # keyed by our ModelSection field names
    block_classes: tuple[str, ...] = ()  # `_no_split_modules` of the model's PreTrainedModel
    classes: frozenset[str] = field(default_factory=frozenset)  # every class the modeling code defines
    source: str = ""  # where the numbers came from, for messages
    attn_softcap: float | None = None  # attn_logit_softcapping (Gemma-2): tanh-capped attention scores
    remote_code: bool = False  # config.json names its own code (auto_map) for a model_type transformers does not ship
    given: frozenset[str] = field(default_factory=frozenset)  # numbers config.json states itself (not class defaults)
    quantized: bool = False  # config.json has a quantization_config: its weights are packed, not the shapes above

    @property
    def is_encoder(self) -> bool:
        return self.model_type in ENCODERS

    @property
    def layer_class(self) -> str:
        """The repeated block: the `_no_split_modules` entry that is a layer, not the embeddings."""
        blocks = [c for c in self.block_classes if "Embedding" not in c]
        return blocks[0] if blocks else ""


# Where config.json says how many experts a Mixture-of-Experts layer has (Mixtral, Qwen2/3-MoE and
# OLMoE, DeepSeek, others).
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_numbers(config_file: Path) -> dict[str, int]:
    """ModelSection's Mixture-of-Experts fields from config.json ({} for a dense model or an unreadable file)."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}

    def numbers(*keys: str) -> list[int]:
        return [int(raw[k]) for k in keys if isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)]

    experts = max(numbers(*_EXPERT_KEYS), default=0)
    if experts < 2:
        return {}
    out = {
        "num_experts": experts,
        "experts_per_token": next(iter(numbers("num_experts_per_tok", "moe_topk", "top_k")), None),
        "expert_intermediate_size": next(iter(numbers("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")), None),
        "shared_expert_intermediate_size": next(iter(numbers("shared_expert_intermediate_size")), None),
    }
    return {key: value for key, value in out.items() if value}


def read_architecture(config_file: Path) -> Architecture:
    """config.json (+ transformers' attribute map and defaults for its model_type) -> Architecture."""
    where = str(config_file)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            [
                Problem(
                    "model.name_or_path", f"{where} is not readable JSON ({type(exc).__name__})", "point at a Hugging Face model directory"
                )
            ]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem("model.name_or_path", f"{where} is not a JSON object", "point at a Hugging Face model directory")])
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError([Problem("model.name_or_path", f"{where} has no model_type", "use a config.json written by transformers")])
    attribute_map, defaults = _config_class(model_type)
    numbers: dict[str, int | bool | None] = {}
    given: set[str] = set()
    for ours, canonical in CANONICAL.items():
        value = _lookup(raw, canonical, attribute_map, {})
        if value is not None:
            given.add(ours)
        else:
            value = _lookup(raw, canonical, attribute_map, defaults)
        if ours == "intermediate_size" and value is None:
            value = next((raw[k] for k in _FFN_ALIASES if raw.get(k) is not None), None)
            given.update(["intermediate_size"] if value is not None else [])
            if value is None and isinstance(numbers.get("hidden_size"), int):
                value = 4 * int(numbers["hidden_size"] or 0)  # GPT-2 style MLP width
        if value is not None:
            want_bool = ours == "tie_word_embeddings"
            if want_bool != isinstance(value, bool) or not isinstance(value, bool | int):
                kind = "true or false" if want_bool else "a whole number"
                raise ConfigError(
                    [Problem(f"model.{ours}", f"{where}: {canonical} is {value!r}, not {kind}", "fix the model's config.json")]
                )
        numbers[ours] = value
    if numbers["num_key_value_heads"] is None:
        numbers["num_key_value_heads"] = numbers["num_attention_heads"]
    if numbers["tie_word_embeddings"] is None:
        numbers["tie_word_embeddings"] = True  # PreTrainedConfig's own default
    blocks, classes = _modeling_classes(model_type, config_file.parent, raw.get("auto_map"))
    softcap = _lookup(raw, "attn_logit_softcapping", attribute_map, defaults)
    softcap = float(softcap) if isinstance(softcap, int | float) and not isinstance(softcap, bool) else None
    remote = isinstance(raw.get("auto_map"), dict) and not ships(model_type)
    return Architecture(
        model_type=model_type,
        numbers=numbers,
        block_classes=blocks,
        classes=classes,
        source=where,
        attn_softcap=softcap,
        remote_code=remote,
        given=frozenset(given),
        quantized=raw.get("quantization_config") is not None,
    )


def ships(model_type: str) -> bool:
    """transformers has its own code for `model_type` (its configuration_<type>.py exists)."""
    root = _transformers_root()
    name = model_type.replace("-", "_")
    return root is not None and (root / "models" / name / f"configuration_{name}.py").is_file()


# `("llama", "LlamaConfig")` / `"llama": "LlamaConfig"`: an entry of transformers' model-type table.
_CONFIG_ENTRY = re.compile(r"""["']([\w.-]+)["']\s*[,:]\s*["'](\w+Config)["']""")
_HEAD_SPLIT = re.compile(r"hidden_size\s*%\s*self\.num_attention_heads")


@lru_cache(maxsize=1)
def known_model_types() -> frozenset[str]:
    """Every model_type the installed transformers maps to a config class (its auto table, read as
    text: `gemma3_text` lives in gemma3/, `gpt-sw3` has no folder of its own); empty when
    transformers is absent or the table moved, and then nothing is refused for it."""
    root = _transformers_root()
    found: set[str] = set()
    for name in ("auto_mappings.py", "configuration_auto.py"):
        path = root / "models" / "auto" / name if root else None
        if path is not None and path.is_file():
            found.update(m.group(1) for m in _CONFIG_ENTRY.finditer(path.read_text(encoding="utf-8")))
    return frozenset(found)


def checks_head_split(model_type: str) -> bool:
    """The config class of `model_type` itself refuses a hidden_size that is not a multiple of the
    attention heads (transformers' `validate_architecture`): AutoConfig fails on every rank."""
    root = _transformers_root()
    name = model_type.replace("-", "_")
    path = root / "models" / name / f"configuration_{name}.py" if root else None
    return path is not None and path.is_file() and _HEAD_SPLIT.search(_source(path)) is not None


@lru_cache(maxsize=64)
def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def architecture_of(model_type: str) -> Architecture:
    """The block classes of a model type named in a recipe (`model.architecture`), for a model whose
    config.json is not on this machine: the numbers then come from the recipe."""
    blocks, classes = _modeling_classes(model_type, Path("."), None)
    return Architecture(model_type=model_type, numbers={}, block_classes=blocks, classes=classes, source=f"model_type {model_type}")


def _lookup(raw: dict[str, Any], canonical: str, attribute_map: dict[str, str], defaults: dict[str, Any]) -> Any:
    alias = attribute_map.get(canonical)
    for source in (raw, defaults):
        for key in (canonical, alias):
            if key is not None and source.get(key) is not None:
                return source[key]
    return None


def _transformers_root() -> Path | None:
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=64)
def _config_class(model_type: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(attribute_map, class-level defaults) of the config class for `model_type`, from source."""
    root = _transformers_root()
    name = model_type.replace("-", "_")
    path = root / "models" / name / f"configuration_{name}.py" if root else None
    if path is None or not path.is_file():
        return {}, {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = {_target(s): s.value for s in node.body if isinstance(s, ast.Assign | ast.AnnAssign) and s.value is not None}
        declared = body.get("model_type")
        if not (isinstance(declared, ast.Constant) and declared.value == model_type):
            continue
        attribute_map = _literal(body.get("attribute_map")) or {}
        defaults = {key: _literal(value) for key, value in body.items() if key and isinstance(value, ast.Constant)}
        return dict(attribute_map), defaults
    return {}, {}


def _modeling_classes(model_type: str, model_dir: Path, auto_map: Any) -> tuple[tuple[str, ...], frozenset[str]]:
    """(`_no_split_modules`, all class names) from the modeling code: remote code files named in
    config.json's auto_map, else transformers' own modeling_<type>.py."""
    files: list[Path] = []
    if isinstance(auto_map, dict):
        for ref in auto_map.values():
            module = str(ref[0] if isinstance(ref, list) else ref).split("--")[-1].rpartition(".")[0]
            if module:
                files.append(model_dir / f"{module}.py")
    root = _transformers_root()
    name = model_type.replace("-", "_")
    if root is not None:
        files.append(root / "models" / name / f"modeling_{name}.py")
    blocks: tuple[str, ...] = ()
    classes: set[str] = set()
    for path in files:
        if not path.is_file():
            continue
        found_blocks, found = _scan(path)
        classes |= found
        blocks = blocks or found_blocks
    return blocks, frozenset(classes)


@lru_cache(maxsize=64)
def _scan(path: Path) -> tuple[tuple[str, ...], frozenset[str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    blocks: tuple[str, ...] = ()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign | ast.AnnAssign) and _target(stmt) == "_no_split_modules":
                    value = _literal(stmt.value)
                    if isinstance(value, list | tuple) and value and not blocks:
                        blocks = tuple(str(v) for v in value)
    return blocks, frozenset(classes)


def _target(stmt: ast.stmt) -> str:
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return ""


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None
