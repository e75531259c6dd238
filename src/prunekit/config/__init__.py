"""Pruning configuration: typed configs plus loaders for the original's 2.x and 1.x forms."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from prunekit.config.schema import PrunerConfig, PruningConfig
from prunekit.errors import ConfigError

__all__ = ["PrunerConfig", "PruningConfig", "load_config"]


def load_config(obj: Any) -> PruningConfig:
    """Turn any supported config description into a :class:`PruningConfig`.

    Accepts a PruningConfig (returned as is: it is immutable), a PrunerConfig, a dict in any form
    (2.x ``pruning_configs`` + globals, 1.x/2.0 ``pruning: approach: ...``), a list of local dicts or
    PrunerConfigs, a ``pathlib.Path`` or str path to a YAML file, or YAML text.
    """
    if isinstance(obj, PruningConfig):
        return obj
    if isinstance(obj, PrunerConfig):
        return PruningConfig(pruners=(obj,))
    if isinstance(obj, Mapping):
        return PruningConfig.from_dict(obj)
    if isinstance(obj, (list, tuple)):
        if not obj:  # naming no pruner is a mistake; silently using all defaults would hide it
            raise ConfigError("config", obj, "allowed: a non-empty list of pruner dicts")
        return PruningConfig.from_kwargs(pruning_configs=list(obj))
    if isinstance(obj, (str, Path)):
        return PruningConfig.from_yaml(obj)
    raise ConfigError("config", obj, "allowed: PruningConfig, PrunerConfig, dict, list of dicts, "
                                     "YAML path or YAML text")

