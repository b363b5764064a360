"""Where a model's files are: the one torch-free piece of model loading.

`launcher prepare` / `run` / `submit` call it before any rank starts (to find the tokenizer for the
data cache), so it must not import torch: a warm `prepare` then costs a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config.resolve import TINY_MODEL
from launcher.config.schema import ModelSection
from launcher.runtime.model.tiny import ensure_tiny_model


class ModelError(Exception):
    """A model that cannot be found or loaded; one line for the user."""


def model_dir(model: ModelSection) -> Path:
    """The local directory holding config, weights and tokenizer (built for tiny-llama)."""
    if model.name_or_path == TINY_MODEL:
        return ensure_tiny_model()
    path = Path(model.name_or_path)
    if path.is_dir():
        return path
    snapshot = Path(model.local_dir) if model.local_dir else None
    if snapshot is not None and (snapshot / "config.json").is_file() and next(snapshot.glob("*.safetensors"), None) is not None:
        return snapshot  # the snapshot the plan found in the HF cache, weights there too
    try:
        from huggingface_hub import snapshot_download

        fetched = Path(snapshot_download(model.name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: {model.name_or_path} is not a local directory and could not be fetched "
            f"({type(exc).__name__}); download it first (huggingface-cli download) and point at the directory"
        ) from None
    return checked(fetched)


def checked(path: Path) -> Path:
    """A directory the plan could not check (fetched from the Hub after it): the same header checks
    (config/modelfiles.py), the first problem as one line before any rank loads it."""
    from launcher.config.arch import read_architecture
    from launcher.config.errors import ConfigError
    from launcher.config.modelfiles import file_problems

    if not (path / "config.json").is_file():
        return path  # nothing to check against: the build says what is missing
    try:
        problems = file_problems(path, read_architecture(path / "config.json"))
    except ConfigError as exc:
        problems = [(exc.problems[0].what, exc.problems[0].fix)]
    if problems:
        what, fix = problems[0]
        raise ModelError(f"model.name_or_path: {what}; {fix}")
    return path
