"""Recipe → validated RunConfig. Imports no torch.

The loader (OmegaConf, YAML) is imported on first use of `load_config` / `config_from_dict`: a
rank reads a plan.json and needs only the schema (launcher/config/resolved.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import RunConfig

if TYPE_CHECKING:
    from launcher.config.load import config_from_dict, load_config

__all__ = ["ConfigError", "Problem", "RunConfig", "config_from_dict", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("config_from_dict", "load_config"):
        from launcher.config import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
