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
from prunekit.config.legacy import translate_overrides
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


def _calibration_batches(dataloader: Any, limit: int | None = None) -> list[dict]:
    """The original's dataloaders as model batches: dicts (kept whole, per batch), id tensors, (ids, ...) tuples."""
    batches = []
    for batch in dataloader:
        if limit is not None and len(batches) >= limit:
            break
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            item = {k: v for k, v in dict(batch).items() if k != "labels"}  # labels only make the model score
        elif isinstance(batch, torch.Tensor):
            item = {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            ids = batch[0]
            item = {"input_ids": ids if ids.dim() == 2 else ids.unsqueeze(0)}
        else:
            raise ConfigError("dataloader", type(batch).__name__, "allowed batches: dicts with input_ids, "
                              "LongTensors of token ids, or (input_ids, ...) tuples")
        batches.append(item)
    if not batches:
        raise ConfigError("dataloader", "no batches", "allowed: a dataloader yielding at least one batch")
    return batches


def _model_device(model: nn.Module, device: Any) -> str | None:
    if device is not None:
        return str(device)
    first = next(model.parameters(), None)
    return str(first.device) if first is not None else None


@ONESHOT_HANDLERS.register("sparse_gpt")
def _sparse_gpt(model: nn.Module, config: PruningConfig, dataloader: Any, loss_func: Any, device: Any) -> Any:
    """SparseGPT to completion, one pass per pruner (each over its own op_names); masks stay prunekit masks."""
    from prunekit.oneshot.api import oneshot
    from prunekit.oneshot.config import OneShotConfig

    configs = []
    for i, p in enumerate(config.pruners):  # every pruner checked before any work
        keys = {"method": "sparsegpt", "pattern": p.pattern, "op_names": p.op_names,
                "excluded_op_names": p.excluded_op_names, "device": _model_device(model, device)}
        if ":" not in p.pattern:  # N:M fixes its own sparsity, the original ignored the target there
            keys["target_sparsity"] = p.target_sparsity
        try:
            configs.append(OneShotConfig(**keys))
        except ConfigError as err:
            raise ConfigError(err.key, err.value, err.allowed, f"in pruning_configs[{i}]") from None
    batches = _calibration_batches(dataloader)
    reports = [oneshot(model, batches, {**c.to_dict(), "nsamples": len(batches)}, progress=True) for c in configs]
    return reports[0] if len(reports) == 1 else reports


def prune_wanda(model: nn.Module, dataloader: Any, sparsity_ratio: float, prune_n: int = 0, prune_m: int = 0,
                nsamples: int = 128, use_variant: bool = False, device: Any = None, low_mem_usage: Any = None,
                dsnot: bool = False) -> Any:
    """The original's standalone Wanda (``neural_compressor.compression.pruner.wanda.prune_wanda``).

    Unstructured at ``sparsity_ratio`` or, with ``prune_n`` and ``prune_m``, N:M (``prune_n`` zeros in every
    ``prune_m`` inputs); the first ``nsamples`` batches of ``dataloader`` calibrate; ``dsnot`` refines the masks.
    ``low_mem_usage`` is accepted and not needed: one decoder block is on the device at a time anyway. Returns
    the :class:`~prunekit.oneshot.report.OneShotReport`; the masks stay on the model as prunekit masks.
    """
    from prunekit.oneshot.api import oneshot

    if bool(prune_n) != bool(prune_m):
        raise ConfigError("prune_n", (prune_n, prune_m), "allowed: both prune_n and prune_m (N:M), or neither")
    keys: dict[str, Any] = {"method": "wanda", "use_variant": use_variant, "dsnot": dsnot,
                            "device": _model_device(model, device), "nsamples": nsamples}
    if prune_n:
        keys["pattern"] = f"{prune_n}:{prune_m}"
    else:
        keys["target_sparsity"] = sparsity_ratio
    from prunekit.oneshot.config import OneShotConfig

    cfg = OneShotConfig(**keys)
    return oneshot(model, _calibration_batches(dataloader, nsamples), cfg, progress=True)


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
        self._engine: _pruning.Pruning | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The training optimizer (optional; group lasso needs it for its learning rate)."""
        return self._engine.optimizer if self._engine is not None else self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        # set before on_train_begin it hooks the engine into the optimizer; set after, it reaches the engine too
        self._optimizer = optimizer
        if self._engine is not None:
            self._engine.optimizer = optimizer

    def update_items_for_all_pruners(self, **kwargs: Any) -> None:
        """Overwrite keys in every pruner (e.g. ``start_step``/``end_step`` computed from epochs). Keys may have
        their 2.x names or the 1.x ones (``update_frequency_on_step``, ``prune_type``, ``excluded_names`` …),
        as :func:`prunekit.load_config` reads them."""
        if self._engine is not None:
            raise RuntimeError("update_items_for_all_pruners must be called before on_train_begin")
        self.config = self.config.with_overrides(**translate_overrides(kwargs))

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


def prepare_compression(model: nn.Module, confs: Any,
                        optimizer: torch.optim.Optimizer | None = None) -> CompressionManager:
    """The original's callback entry point: ``cm = prepare_compression(model, config)``, then
    ``cm.callbacks.on_train_begin()``, ``on_step_begin``, ``on_before_optimizer_step``,
    ``on_after_optimizer_step`` … in the training loop.

    ``optimizer`` (prunekit's addition, needed by ``reg_type: group_lasso``, whose shrink is scaled by its learning
    rate) hooks the pruning into its step; the callbacks above then stay callable and harmless."""
    if isinstance(confs, (list, tuple)) and confs and not isinstance(confs[0], dict):
        pruning_confs = [c for c in confs if isinstance(c, PruningConfig)]
        if len(pruning_confs) != len(confs):
            raise ConfigError("confs", confs, "prunekit.compat.prepare_compression takes pruning configs only; "
                              "distillation is done by the training loop (see prunekit.recipes.distill)")
        confs = PruningConfig(pruners=tuple(p for c in pruning_confs for p in c.pruners))
    return CompressionManager(model, _pruning.Pruning(model, confs, optimizer))


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


__all__ = ["ONESHOT_HANDLERS", "WeightPruningConfig", "Pruning", "prepare_compression", "prepare_pruning",
           "prune_wanda", "CompressionManager", "parse_auto_slim_config", "model_slim"]
