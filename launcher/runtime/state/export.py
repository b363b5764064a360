"""`launcher export`: a sharded checkpoint → a Hugging Face model directory (safetensors).

Reads the DCP checkpoint without a process group, a bounded group of tensors at a time (one output
shard), so memory stays near one shard however large the model. Full models are written under
their Hugging Face names; LoRA/QLoRA runs write the adapter alone (peft format) or, with --merge,
the base model with the adapter merged in (a QLoRA base is reloaded in bf16 for that). A DeepSpeed
checkpoint is read through DeepSpeed's own zero_to_fp32, lazily. Afterwards
every expected parameter is checked for presence, shape and dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from launcher.config.errors import ConfigError
from launcher.plan import Plan
from launcher.runtime.model.build import DTYPES
from launcher.runtime.model.conversions import Conversions, SaveConversions
from launcher.runtime.model.files import ModelError, model_dir
from launcher.runtime.state import checkpoint as ckpt

MAX_SHARD_BYTES = 2 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


class ExportError(Exception):
    pass


def export_run(run_dir: str, out: str, step: int | None = None, merge: bool = False, best: bool = False, force: bool = False) -> int:
    try:
        if best:
            if step is not None:
                raise ExportError("--best and --step: give one of them")
            step = best_step(Path(run_dir))
        refuse_occupied(Path(out), force)
        with staged(Path(out)) as folder:
            written = export(Path(run_dir), folder, step, merge)
    except (ExportError, ckpt.CheckpointError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # plan.json not a regular file, or edited into an invalid config
        print(str(exc), file=sys.stderr)
        return 2
    except OSError as exc:  # ENOSPC, EROFS, EACCES: one line naming the file
        print(f"error: {exc.filename or out}: cannot write ({exc.strerror}); free some space, or choose a writable --out", file=sys.stderr)
        return 2
    print(f"launcher: exported {written} tensors to {out}")
    return 0


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Where an export writes: a new folder beside --out, renamed into place once the export is
    complete and verified, so a failed one leaves nothing behind (it left config and tokenizer files
    without weights). A non-empty --out (with --force) is written in place."""
    from launcher.runfiles import umask

    if out.is_symlink() or (out.is_dir() and any(out.iterdir())):
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~umask())
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def refuse_occupied(out: Path, force: bool) -> None:
    """An export writes config.json, model*.safetensors, the tokenizer files: into a folder holding
    anything already, only when asked (--force), never silently over a user's files."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder; choose a new folder")
    held = sorted(p.name for p in out.iterdir())
    for name in held:  # even with --force: the export would write through a link to wherever it points
        if (out / name).is_symlink():
            raise ExportError(
                f"--out {out}: holds {name}, a symbolic link (to {os.path.realpath(out / name)}); remove it, or choose a new folder"
            )
    if held and not force:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ExportError(f"--out {out}: is not empty (it holds {shown}); choose a new folder, or add --force to write over it")


def best_step(run_dir: Path) -> int:
    """The step early stopping recorded as best, from the newest complete checkpoint's manifest."""
    newest = ckpt.find_resume(run_dir / "checkpoints", "auto")
    best = ckpt.best_checkpoint(newest) if newest is not None else None
    if best is None:
        raise ExportError(f"--best: {run_dir} has no best checkpoint (train.early_stopping was not set); use --step N")
    return int(best.name.removeprefix("step-"))


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint to export, its files checked against the sizes and CRC-32s its manifest
    recorded (as a resume checks them): the newest that passes, saying which were passed over, or
    the one --step names, refused if it fails."""
    root = run_dir / "checkpoints"
    if step is None:
        for folder in ckpt.checkpoints(root):
            ok, reason = ckpt.is_complete(folder, verify=True)
            if ok:
                return folder
            print(f"warning: {folder} cannot be exported: {reason}; trying the one before", file=sys.stderr)
        raise ExportError(f"{root}: no complete, intact checkpoint to export")
    folder = ckpt.step_dir(root, step)
    if not folder.is_dir():
        steps = ", ".join(str(int(p.name.removeprefix("step-"))) for p in reversed(ckpt.checkpoints(root))) or "none"
        raise ExportError(f"--step {step}: {root} has no checkpoint at step {step}; steps saved: {steps}")
    ok, reason = ckpt.is_complete(folder, verify=True)
    if not ok:
        raise ExportError(f"--step {step}: {folder} cannot be exported: {reason}")
    return folder


def export(run_dir: Path, out: Path, step: int | None, merge: bool) -> int:
    if not (run_dir / "plan.json").exists():
        raise ExportError(f"{run_dir}: not a run directory (no plan.json)")
    cfg = Plan.load(run_dir / "plan.json").run_config
    if merge and not cfg.method.low_rank:
        raise ExportError(
            f"--merge: merges a LoRA/QLoRA adapter into its base model, but this run's method is {cfg.method.name}; leave --merge out"
        )
    folder = pick_checkpoint(run_dir, step)
    base = model_dir(cfg.model)
    read: Any
    if cfg.parallel.backend == "deepspeed":
        read = DeepSpeedModelReader(folder)
    else:
        read = DcpModelReader(folder / "model_optim")
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg.model.dtype]
    labels = json.loads((run_dir / "labels.json").read_text()) if cfg.task == "classification" else None
    heads = head_names(base, cfg, labels) if labels else []
    if cfg.method.peft and not merge:
        from launcher.runtime.model.methods import write_adapter

        count = write_adapter(read, cfg, out, heads)
    elif cfg.method.low_rank and any(".experts." in k and "lora_" in k for k in read.keys()):  # noqa: SIM118
        count = _merge_with_peft(read, cfg, base, out, dtype, heads)
    elif cfg.method.low_rank:
        from launcher.runtime.model.methods import merged_tensors

        _copy_side_files(base, out, dtype, cfg.task, labels)
        save = save_pretrained_layout(out)
        count = write_model(save(merged_tensors(read, cfg, base, dtype, heads, expected_keys(out, cfg.task))), out, dtype)
    else:
        _copy_side_files(base, out, dtype, cfg.task, labels)
        save = save_pretrained_layout(out)
        count = write_model(save((name.removeprefix("model."), tensor) for name, tensor in read.items()), out, dtype)
    verify(out, cfg.task)
    return count


def head_names(base: Path, cfg: Any, labels: list[str]) -> list[str]:
    """A classifier's head modules (score / classifier, a pooler), by structure, named as in the model."""
    from launcher.runtime.model.build import build_on_meta, head_modules

    model = build_on_meta(base, cfg.model, "sdpa", torch.float32, cfg.task, labels)
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(module)] for module in head_modules(model, pooler=False)]  # what LoRA trains in full


class DcpModelReader:
    """Model tensors of a DCP checkpoint, loaded in groups of at most MAX_SHARD_BYTES."""

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        metadata = ckpt.SafeReader(str(path)).read_metadata()  # a pickle: read by the restricted unpickler
        self.tensors = {
            key: meta
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }

    def keys(self) -> list[str]:
        return list(self.tensors)

    def items(self):  # -> Iterator[tuple[str, torch.Tensor]]
        group: dict[str, torch.Tensor] = {}
        size = 0
        for key, meta in self.tensors.items():
            group[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
            size += group[key].numel() * group[key].element_size()
            if size >= MAX_SHARD_BYTES:
                ckpt.safe_load(group, self.path, no_dist=True)
                yield from group.items()
                group, size = {}, 0
        if group:
            ckpt.safe_load(group, self.path, no_dist=True)
            yield from group.items()


def write_model(tensors, out: Path, dtype: torch.dtype) -> int:  # tensors: Iterable[tuple[str, Tensor]]
    """Write safetensors shards (with an index when there is more than one)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    paths: list[Path] = []
    weight_map: dict[str, int] = {}

    def flush() -> None:
        paths.append(out / f"shard-{len(paths):05d}.safetensors")
        save_file(shards[-1], str(paths[-1]), metadata={"format": "pt"})
        shards.append({})

    for name, tensor in tensors:
        tensor = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        if size and size + tensor.numel() * tensor.element_size() > MAX_SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = tensor
        weight_map[name] = len(paths)
        size += tensor.numel() * tensor.element_size()
    if shards[-1]:
        flush()
    total = len(paths)
    if total == 1:
        paths[0].rename(out / "model.safetensors")
    else:
        names = [out / f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        for old, new in zip(paths, names):
            old.rename(new)
        index = {"metadata": {}, "weight_map": {k: names[i].name for k, i in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(weight_map)


def _copy_side_files(base: Path, out: Path, dtype: torch.dtype, task: str = "causal_lm", labels: list[str] | None = None) -> None:
    """Tokenizer and generation config as they are; config.json with the dtype actually written and,
    for a classifier, its architecture and label map (id2label / label2id)."""
    for name in ("generation_config.json", *_TOKENIZER_FILES):
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    config = json.loads((base / "config.json").read_text())
    written = str(dtype).removeprefix("torch.")
    config.update({key: written for key in ("dtype", "torch_dtype") if key in config} or {"dtype": written})
    if labels is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config["model_type"]]]
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        if config.get("pad_token_id") is None:
            eos = config.get("eos_token_id")
            config["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _merge_with_peft(read: Any, cfg: Any, base: Path, out: Path, dtype: torch.dtype, heads: list[str]) -> int:
    """LoRA on a Mixture-of-Experts model's fused expert weights (peft's ParamWrapper, a 3-D delta per
    expert) merged by peft itself: the base loaded whole in host memory, the adapter merged with
    merge_and_unload, then saved in save_pretrained's layout. Dense models merge tensor by tensor."""
    import tempfile

    from peft import PeftModel

    from launcher.runtime.model.build import model_class
    from launcher.runtime.model.methods import write_adapter

    if cfg.task != "causal_lm":
        raise ExportError("--merge: a classifier on a Mixture-of-Experts model is exported as its adapter; leave --merge out")
    with tempfile.TemporaryDirectory(dir=out) as adapter:
        write_adapter(read, cfg, Path(adapter), heads)
        model = model_class(cfg.task).from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    _copy_side_files(base, out, dtype, cfg.task, None)
    return write_model(save_pretrained_layout(out)(merged.state_dict().items()), out, dtype)


def save_pretrained_layout(out: Path) -> Callable[[Iterable[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]:
    """The model's tensors → what save_pretrained writes for the exported config.json: a tied output
    embedding once, under the input embedding's name (a full GPT-2 or Gemma export wrote lm_head.weight
    too), then transformers' conversions reversed for the names and layout (conversions.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    convert = SaveConversions(json.loads((out / "config.json").read_text()), config)
    tied = getattr(config, "tie_word_embeddings", False)

    def save(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return convert((key, tensor) for key, tensor in tensors if not (tied and key == "lm_head.weight"))

    return save


def _meta_model(out: Path, task: str) -> torch.nn.Module:
    from transformers import AutoConfig

    from launcher.runtime.model.build import model_class

    with torch.device("meta"):
        return model_class(task).from_config(AutoConfig.from_pretrained(out))


def expected_keys(out: Path, task: str, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Parameter name → shape of the model the exported config.json describes."""
    model = model if model is not None else _meta_model(out, task)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    return expected


def verify(out: Path, task: str) -> None:
    """Every parameter the architecture expects is present with the right shape."""
    from safetensors import safe_open

    if not (out / "config.json").exists():
        return  # an adapter: peft's own files
    model = _meta_model(out, task)
    expected = expected_keys(out, task, model)
    found: dict[str, Any] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                found[key] = handle.get_slice(key).get_shape()
    # read back as transformers loads it: renamed, and merged where it merges (shapes then checked on load)
    plain, groups = Conversions(model).groups(list(found))
    loaded: dict[str, Any] = {renamed: found[key] for key, renamed in plain.items()} | dict.fromkeys(groups)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ExportError(f"{out}: {len(missing)} parameters were not written, e.g. {missing[0]}")
    wrong = [k for k in expected if loaded[k] is not None and list(loaded[k]) != list(expected[k])]
    if wrong:
        raise ExportError(f"{out}: {wrong[0]} has shape {loaded[wrong[0]]}, expected {list(expected[wrong[0]])}")


class DeepSpeedModelReader:
    """Consolidated fp32 model tensors of a DeepSpeed checkpoint (DeepSpeed's zero_to_fp32).

    Lazy mode: the ranks' flat fp32 partitions are read once and each full tensor is assembled only
    when the export writes it, so host memory holds the partitions plus one tensor (the eager path
    materialised the whole fp32 model on top of the partitions: twice the model).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _state(self) -> dict[str, Any]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(self.folder), tag=ckpt.DEEPSPEED_TAG, lazy_mode=True)

    def items(self):  # -> Iterator[tuple[str, torch.Tensor]], names prefixed "model." like DCP's
        for name, lazy in self._state().items():
            yield f"model.{name}", lazy.contiguous() if hasattr(lazy, "contiguous") else lazy

    def keys(self) -> list[str]:
        return [f"model.{name}" for name in self._state()]
