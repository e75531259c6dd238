"""The original's names and call shapes, so users of Intel Neural Compressor's pruner switch by import line.

    # from neural_compressor.training import WeightPruningConfig, prepare_compression, prepare_pruning
    from prunekit.compat import WeightPruningConfig, prepare_compression, prepare_pruning
    # from neural_compressor.experimental.pytorch_pruner.pruning import Pruning       (1.x)
    from prunekit.compat import Pruning

Behaviour follows prunekit (masks in state, no ``torch.save`` patch, validated configs), not the original's
defects.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from prunekit import pruning as _pruning
from prunekit.config import PruningConfig, load_config
from prunekit.errors import ConfigError
from prunekit.registry import Registry
from prunekit.slimming.compat import model_slim, parse_auto_slim_config

_ONESHOT_TYPES = ("sparse_gpt", "sparsegpt", "retrain_free", "wanda")

#: pruning_types that ``prepare_pruning(..., dataloader=...)`` runs to completion at once, as the original did:
#: name -> ``handler(model, config_with_only_those_pruners, dataloader, loss_func, device)``
ONESHOT_HANDLERS: Registry[Callable[..., Any]] = Registry("pruning_type")


@ONESHOT_HANDLERS.register("retrain_free")
def _retrain_free(model: nn.Module, config: PruningConfig, dataloader: Any, loss_func: Any, device: Any) -> Any:
    from prunekit.oneshot.retrain_free import retrain_free_prune  # the one-shot package loads only when used

    return retrain_free_prune(model, dataloader, config, loss_func=loss_func, device=device)


def WeightPruningConfig(pruning_configs: Iterable[dict] | None = None, target_sparsity: float = 0.9,
                        pruning_type: str = "snip_momentum", pattern: str = "4x1", op_names: list | None = None,
                        excluded_op_names: list | None = None, backend: Any = None, start_step: int = 0,
                        end_step: int = 0, pruning_scope: str = "global", pruning_frequency: int = 1,
                        min_sparsity_ratio_per_op: float = 0.0, max_sparsity_ratio_per_op: float = 0.98,
                        sparsity_decay_type: str = "exp", pruning_op_types: list | None = None,
                        low_memory_usage: bool = False, **kwargs: Any) -> PruningConfig:  # noqa: N802
    """The original's 2.x/3.x config: global keyword arguments plus a list of local dicts (local keys win).

    Returns a new immutable :class:`PruningConfig`; nothing is shared between calls.
    """
    global_kwargs = dict(
        target_sparsity=target_sparsity, pruning_type=pruning_type, pattern=pattern,
        op_names=list(op_names or []), excluded_op_names=list(excluded_op_names or []), backend=backend,
        start_step=start_step, end_step=end_step, pruning_scope=pruning_scope,
        pruning_frequency=pruning_frequency, min_sparsity_ratio_per_op=min_sparsity_ratio_per_op,
        max_sparsity_ratio_per_op=max_sparsity_ratio_per_op, sparsity_decay_type=sparsity_decay_type,
        pruning_op_types=list(pruning_op_types or ["Conv", "Linear"]), low_memory_usage=low_memory_usage,
        **kwargs)
    locals_ = [dict(c) for c in (pruning_configs if pruning_configs is not None else [{}])]
    return PruningConfig.from_kwargs(pruning_configs=locals_, **global_kwargs)


class Pruning:
    """The 1.x/2.0 class: ``Pruning(yaml_or_config)``, then ``.model = model``, then the callbacks.

    Pruners are built by ``on_train_begin`` (the model must be set first), as in the original.
    """

    def __init__(self, config: Any) -> None:
        self.config: PruningConfig = load_config(config)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._engine: _pruning.Pruning | None = None

    def update_items_for_all_pruners(self, **kwargs: Any) -> None:
        """Overwrite keys in every pruner (e.g. ``start_step``/``end_step`` computed from epochs)."""
        if self._engine is not None:
            raise RuntimeError("update_items_for_all_pruners must be called before on_train_begin")
        self.config = self.config.with_overrides(**kwargs)

    update_config = update_items_for_all_pruners  # the 2.0 name

    @property
    def engine(self) -> _pruning.Pruning:
        if self._engine is None:
            if self.model is None:
                raise RuntimeError("set `.model` before on_train_begin(), as with the original Pruning")
            self._engine = _pruning.Pruning(self.model, self.config, self.optimizer)
        return self._engine

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.engine.on_train_begin()

    def __getattr__(self, name: str) -> Any:
        # every other callback (on_step_begin, on_before_optimizer_step …) and query goes to the engine
        if name.startswith("on_") or name in ("state_dict", "load_state_dict", "report", "current_sparsity"):
            return getattr(self.engine, name)
        raise AttributeError(name)

    def get_sparsity_ratio(self) -> float:
        return self.engine.current_sparsity()


class CompressionManager:
    """What ``prepare_compression`` returns: ``.model`` and ``.callbacks`` (the pruning object)."""

    def __init__(self, model: nn.Module, callbacks: _pruning.Pruning) -> None:
        self.model = model
        self.callbacks = callbacks

    def save(self, path: str) -> None:
        """Save the model's state_dict and the pruning state next to it."""
        torch.save({"model": self.model.state_dict(), "pruning": self.callbacks.state_dict()}, path)


def prepare_compression(model: nn.Module, confs: Any) -> CompressionManager:
    """The original's callback entry point: ``cm = prepare_compression(model, config)``, then
    ``cm.callbacks.on_train_begin()``, ``on_step_begin``, ``on_before_optimizer_step``,
    ``on_after_optimizer_step`` … in the training loop."""
    if isinstance(confs, (list, tuple)) and confs and not isinstance(confs[0], dict):
        pruning_confs = [c for c in confs if isinstance(c, PruningConfig)]
        if len(pruning_confs) != len(confs):
            raise ConfigError("confs", confs, "prunekit.compat.prepare_compression takes pruning configs only; "
                              "distillation is done by the training loop (see prunekit.recipes.distill)")
        confs = PruningConfig(pruners=tuple(p for c in pruning_confs for p in c.pruners))
    return CompressionManager(model, _pruning.Pruning(model, confs))


def prepare_pruning(model: nn.Module, config: Any, optimizer: torch.optim.Optimizer | None = None,
                    dataloader: Any = None, loss_func: Any = None, framework: str = "pytorch",
                    device: Any = None) -> _pruning.Pruning:
    """The original's auto-hook entry point.

    Training-aware pruners need ``optimizer``; one-shot ones (:data:`ONESHOT_HANDLERS`, e.g. ``retrain_free``)
    need ``dataloader`` and run to completion here. One family gives its object, both a list (as the original).
    """
    if framework != "pytorch":
        raise ConfigError("framework", framework, "allowed: 'pytorch'")
    cfg = load_config(config)
    by_handler: dict[str, list] = {}
    training = []
    for p in cfg.pruners:
        if p.criterion in ONESHOT_HANDLERS:
            by_handler.setdefault(p.criterion, []).append(p)
        elif any(t in p.pruning_type for t in _ONESHOT_TYPES):
            raise ConfigError("pruning_type", p.pruning_type,
                              f"allowed one-shot types: {', '.join(ONESHOT_HANDLERS.names())}",
                              "this one-shot type is not available through prepare_pruning")
        else:
            training.append(p)
    if by_handler and dataloader is None:
        raise ConfigError("dataloader", None, f"required for pruning_type {', '.join(by_handler)} (one-shot "
                          "pruning runs over the calibration dataloader once)")
    if training and optimizer is None or not training and not by_handler:
        raise ConfigError("optimizer", optimizer, "training-aware pruning needs the optimizer")
    results = []
    if training:
        results.append(_pruning.prepare_pruning(model, PruningConfig(pruners=tuple(training)), optimizer))
    for name, pruners in by_handler.items():
        results.append(ONESHOT_HANDLERS.get(name)(model, PruningConfig(pruners=tuple(pruners)), dataloader,
                                                  loss_func, device))
    return results[0] if len(results) == 1 else results


__all__ = ["ONESHOT_HANDLERS", "WeightPruningConfig", "Pruning", "prepare_compression", "prepare_pruning", "CompressionManager",
           "parse_auto_slim_config", "model_slim"]
