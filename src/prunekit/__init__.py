"""prunekit: make PyTorch models sparse during training or in one shot, then physically smaller and faster.

Quick start::

    import prunekit
    pruning = prunekit.prepare_pruning(model, {"target_sparsity": 0.9, "pattern": "4x1",
                                              "start_step": 100, "end_step": 1000,
                                              "pruning_frequency": 50}, optimizer)
    for batch in loader:           # a plain PyTorch loop
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pruning.on_train_end()         # prints the sparsity report
"""
from prunekit.config import PrunerConfig, PruningConfig, load_config
from prunekit.errors import ConfigError, PrunekitError, SelectionError, SlimmingError
from prunekit.pruning import Pruning, prepare_pruning
from prunekit.report import SparsityReport, sparsity_report
from prunekit import oneshot, slimming
from prunekit.oneshot import OneShotConfig, OneShotReport
from prunekit.slimming import auto_slim_configs, load_slimmed, save_slimmed, slim

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "OneShotConfig", "OneShotReport", "PrunekitError", "PrunerConfig", "Pruning", "PruningConfig", "SelectionError",
    "SlimmingError", "SparsityReport", "auto_slim_configs", "load_config", "load_slimmed", "oneshot", "prepare_pruning",
    "save_slimmed", "slim", "slimming", "sparsity_report", "__version__",
]
