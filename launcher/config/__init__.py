"""Recipe → validated RunConfig. Imports no torch."""

from launcher.config.errors import ConfigError, Problem
from launcher.config.load import config_from_dict, load_config
from launcher.config.schema import RunConfig

__all__ = ["ConfigError", "Problem", "RunConfig", "config_from_dict", "load_config"]
