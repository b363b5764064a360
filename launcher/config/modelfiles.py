"""A local model directory checked at plan time from its headers only: config.json's own rules, the
tokenizer files, every safetensors header and the shapes they declare. Torch-free and bounded.

Without this a broken directory plans cleanly and then fails on every rank after start-up (a
transformers ValueError, a safetensors error, a size mismatch, a CUDA index error at the first
token beyond the embedding). Each problem is one line naming the file. A safetensors file is read
up to the end of its header: 8 bytes (little-endian u64 header length), then that many bytes of
JSON, never more than the 100 MB safetensors itself allows; a FIFO is refused before it is opened.
A directory with config.json alone (shapes for the planner, weights elsewhere) is left to the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeGuard

from launcher.config.arch import Architecture, checks_head_split, known_model_types

MAX_HEADER = 100_000_000  # safetensors' own limit on the header length
MAX_JSON = 200_000_000  # an index or tokenizer file larger than this is refused (real ones are under 50 MB)
INDEX = "model.safetensors.index.json"
# Any one of these makes a tokenizer AutoTokenizer can load (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
# Bits per element of each safetensors dtype; an unknown one is not size-checked (a newer format).
_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
# Model types whose layers are `model.layers.N.self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`
# with the plain shapes (others reuse the names with other shapes: MLA, gated attention, fused qkv).
_LLAMA_LAYOUT = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "granite", "olmo2"}
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ATTENTION = {f"self_attn.{x}_proj.weight": x for x in "qkvo"}
_Q_PROJ = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.q_proj\.weight$")
_SHAPE_KEYS = ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight")
_REDOWNLOAD = "download the model again (or point model.name_or_path at a complete copy)"

Header = dict[str, tuple[str, list[int]]]  # tensor name -> (dtype, shape)


class Refused(Exception):
    """One file's problem: (file, what, fix)."""

    def __init__(self, file: Path, what: str, fix: str = _REDOWNLOAD) -> None:
        super().__init__(f"{file}: {what}")
        self.fix = fix


def config_problems(arch: Architecture) -> list[tuple[str, str]]:
    """(what, fix) for a config.json transformers itself would refuse on every rank."""
    found: list[tuple[str, str]] = []
    known = known_model_types()
    if known and arch.model_type not in known and not arch.remote_code:
        found.append(
            (
                f"{arch.source}: model_type {arch.model_type!r} is not a model type transformers {_transformers_version()} ships",
                "upgrade transformers (`launcher doctor` shows the tested versions), or use a model it implements",
            )
        )
    hidden, heads, head_dim = _number(arch, "hidden_size"), _number(arch, "num_attention_heads"), arch.numbers.get("head_dim")
    if isinstance(head_dim, int) and head_dim < 1:
        found.append((f"{arch.source}: head_dim {head_dim} is not positive", "fix the model's config.json"))
    if hidden and heads and hidden % heads and (head_dim is None or checks_head_split(arch.model_type)):
        found.append(
            (
                f"{arch.source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                "fix the model's config.json (transformers refuses it)",
            )
        )
    return found


def file_problems(directory: Path, arch: Architecture) -> list[tuple[str, str]]:
    """(what, fix) for the weights and tokenizer of a local model directory, from headers only."""
    try:
        weights = sorted(directory.glob("*.safetensors"))
        index = directory / INDEX
        if not weights and not _exists(index):
            return []  # config.json alone: the plan uses its numbers, the run reports the missing weights
        headers: dict[Path, Header] = {}
        for file in weights:
            headers[file] = read_header(file)
        if _exists(index):
            _check_index(index, directory)
        tokens = _tokenizer_size(directory)
        return list(_shape_problems(headers, arch, tokens, directory))
    except Refused as exc:
        return [(str(exc), exc.fix)]
    except OSError as exc:
        where = exc.filename or directory
        return [(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})", "check the model directory's permissions")]


def read_header(file: Path) -> Header:
    """The tensors a safetensors file declares, each checked against the file's size."""
    size = _regular(file, "replace it with the weights file").st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise Refused(file, f"is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise Refused(file, f"declares a {length}-byte header, more than safetensors' {MAX_HEADER}")
        if 8 + length > size:
            raise Refused(
                file, f"declares a {length}-byte header, but only {size - 8} bytes follow its length (truncated, or not safetensors)"
            )
        text = handle.read(length)
    raw = _json(file, text, "header")
    if not isinstance(raw, dict):
        raise Refused(file, "its header is not a JSON object")
    data_bytes = size - 8 - length
    header: Header = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        fields: dict[str, Any] = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if not (isinstance(dtype, str) and _ints(shape) and _ints(offsets) and len(offsets) == 2):
            raise Refused(file, f"tensor {name!r} has no valid dtype, shape and data_offsets in the header")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise Refused(file, f"tensor {name!r} has data_offsets [{begin}, {end}] beyond the file's {data_bytes} data bytes (truncated?)")
        bits = _BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            raise Refused(
                file,
                f"tensor {name!r} is {dtype} {shape} ({math.prod(shape) * bits // 8} bytes) but its data_offsets hold {end - begin} bytes",
            )
        header[name] = (dtype, shape)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise Refused(file, f"tensor {name!r} starts at data byte {begin}, not {position}: tensors overlap or leave a gap")
        position = end
    if position != data_bytes:
        raise Refused(file, f"its tensors end at data byte {position}, but the file holds {data_bytes} (truncated or padded)")
    return header


def _check_index(index: Path, directory: Path) -> None:
    raw = _json(index, _read_json_bytes(index), "index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise Refused(index, "has no weight_map of tensor name -> shard file")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise Refused(index, f"names shard {shard!r}, which is not a file name in the model directory")
        if not _exists(directory / shard):
            raise Refused(index, f"names shard {shard}, which is missing")


def _tokenizer_size(directory: Path) -> int | None:
    """Tokens of tokenizer.json (highest id + 1, added tokens included); None when no tokenizer.json.
    Refused: no tokenizer files at all, or a tokenizer.json / tokenizer_config.json that is not JSON."""
    present = [name for name in TOKENIZER_FILES if _exists(directory / name)]
    present += [p.name for p in directory.glob("*.tiktoken")]
    if not present:
        raise Refused(
            directory,
            f"has weights but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
            "copy the base model's tokenizer files into the model directory",
        )
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if _exists(directory / name):
            _json(directory / name, _read_json_bytes(directory / name), "file")
    file = directory / "tokenizer.json"
    if "tokenizer.json" not in present:
        return None
    data = _read_json_bytes(file)
    raw = _json(file, data, "file")
    model = raw.get("model") if isinstance(raw, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids: list[Any] = []
    if isinstance(vocab, dict):
        ids = list(vocab.values())
    elif isinstance(vocab, list):
        ids = [len(vocab) - 1] if vocab else []  # Unigram: a list of [piece, score], ids are positions
    added = raw.get("added_tokens") if isinstance(raw, dict) else None
    ids += [t.get("id") for t in added if isinstance(t, dict)] if isinstance(added, list) else []
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def _shape_problems(headers: dict[Path, Header], arch: Architecture, tokens: int | None, directory: Path) -> Iterator[tuple[str, str]]:
    """Declared shapes against config.json's numbers, for the layouts recognised here (the first
    mismatch only: one wrong shard makes many); then the embedding rows against the tokenizer."""
    hidden, vocab, inter, heads, kv_heads = (_number(arch, k) for k in _SHAPE_KEYS)
    head_dim = _number(arch, "head_dim") if "head_dim" in arch.given else None
    where = {name: (file, dtype, shape) for file, header in headers.items() for name, (dtype, shape) in header.items()}
    layers = _number(arch, "num_layers")
    if arch.model_type in _LLAMA_LAYOUT and not arch.quantized and layers and where:  # the weights of another model?
        seen = {int(m.group(1)) for name in where if (m := _Q_PROJ.match(name))}
        if len(seen) < layers:
            lacking = min(set(range(layers)) - seen)
            held = f"it holds {len(seen)} of its {layers} layers" if seen else f"its tensors are named like {min(where)}"
            yield (
                f"{directory}: the safetensors have no model.layers.{lacking}.self_attn.q_proj.weight, which a {arch.model_type} "
                f"model with {arch.source}'s numbers has ({held}): the weights are another model's",
                f"point model.name_or_path at the weights {arch.source} belongs to (or fix config.json)",
            )
            return
    expected: dict[str, list[int]] = {}
    if hidden and vocab and {"hidden_size", "vocab_size"} <= arch.given:  # a class default may not be this model's
        expected.update({name: [vocab, hidden] for name in (*_EMBEDDINGS, "lm_head.weight")})
    if arch.model_type in _LLAMA_LAYOUT and not arch.quantized and hidden and heads and kv_heads and inter:
        for name in where:
            match = _LAYER.match(name)
            part = match.group(2) if match else ""
            if part in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
                expected[name] = [hidden, inter] if part == "mlp.down_proj.weight" else [inter, hidden]
            elif part in _ATTENTION and match is not None:
                q_shape = where.get(name[: match.start(2)] + "self_attn.q_proj.weight", (None, "", []))[2]
                width = head_dim or (q_shape[0] // heads if q_shape else 0)  # the head width the q rows imply
                out = {"q": heads * width, "k": kv_heads * width, "v": kv_heads * width, "o": hidden}[_ATTENTION[part]]
                if width:
                    expected[name] = [out, heads * width if part == "self_attn.o_proj.weight" else hidden]
    numbers = ", ".join(f"{k} {arch.numbers.get(k)}" for k in (*_SHAPE_KEYS, "head_dim"))
    for name, want in expected.items():
        file, dtype, shape = where.get(name, (None, "", []))
        if file is not None and dtype in _FLOATS and shape != want:
            yield (
                f"{file}: tensor {name} has shape {shape}, but {arch.source} ({numbers}) makes it {want}",
                f"point model.name_or_path at the weights {arch.source} belongs to (or fix config.json)",
            )
            return
    rows: int | None = next(
        (where[name][2][0] for name in _EMBEDDINGS if name in where and where[name][2]), vocab if "vocab_size" in arch.given else None
    )
    if tokens is not None and rows is not None and rows < tokens:
        source = "config.json's vocab_size" if rows == vocab else "its safetensors header"
        yield (
            f"{directory / 'tokenizer.json'} has {tokens} tokens, but the model's embedding has {rows} rows ({source}): "
            "the ranks fail at the first token id past the last row",
            "use the model's own tokenizer, or resize the embeddings to it (resize_token_embeddings) and save the model",
        )


def _number(arch: Architecture, key: str) -> int | None:
    value = arch.numbers.get(key)
    return value if _positive(value) else None  # type: ignore[return-value]


def _regular(file: Path, fix: str) -> os.stat_result:
    """stat() of a regular file (following links, as the HF cache's are); a FIFO would block a read."""
    info = os.stat(file)
    if not stat.S_ISREG(info.st_mode):
        raise Refused(file, "is not a regular file (a FIFO, a device or a folder)", fix)
    return info


def _read_json_bytes(file: Path) -> bytes:
    size = _regular(file, "replace it with the model's own file").st_size
    if size > MAX_JSON:
        raise Refused(file, f"is {size} bytes, more than {MAX_JSON}")
    return file.read_bytes()


def _json(file: Path, data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Refused(
            file, f"its {what} is not JSON ({type(exc).__name__})" if what == "header" else f"is not JSON ({type(exc).__name__})"
        ) from None


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _positive(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _transformers_version() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:
        return "(not installed)"
