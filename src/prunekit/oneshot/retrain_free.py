"""Retrain-free channel pruning (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers").

``retrain_free_prune(model, dataloader, config)`` runs the whole calibration set once through the frozen model:

1. **Fisher scores** of the channel masks: per batch ``t`` the loss gradient of each unit mask,
   ``g_t = Σ_unit W·∂L_t/∂W`` (:func:`prunekit.criteria.fisher.unit_mask_gradient`), and the score
   ``F = Σ_t g_t²``. The loss is ``loss_func(model(x), y)`` for ``(x, y)`` batches or ``model(**batch).loss``
   for dict batches, as in the original. No weight is updated.
2. **Threshold**: the units with the lowest ``F`` over all selected layers (``pruning_scope: global``) or per
   layer (``local``) until ``target_sparsity`` of their elements is reached — exactly ``round(target · units)``
   when the layers have one shape; no layer beyond ``max_sparsity_ratio_per_op``.
3. **Mask rearrangement** per layer with ``p`` pruned units: start from the ``p`` lowest ``F``; for each other
   unit in ascending ``F``, add it and drop the unit whose removal leaves the smallest
   ``Σ_t (Σ_{pruned} g_t)²`` (the Fisher estimate of the loss increase of pruning the set together). The count
   stays ``p``. The original crashed here for ``1xchannel`` (a ``[out, 1]`` mask broadcast against
   ``[out, out]``); units are handled as flat vectors here, so any channel pattern works.
4. The masks become prunekit masks (``PrunedLayer`` with the channel ``BlockPattern``) and the weights are
   zeroed, so :func:`prunekit.slim` can remove ``channelx1`` channels of FFN second linears afterwards (call
   ``result.detach(remove_masks=True)`` first).

Unlike the original, scores come from the dense model in one pass (the original's scheduler could apply early
masks to later calibration batches), and every batch's positional and keyword inputs are used as given.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from prunekit.config import PruningConfig, load_config
from prunekit.config.schema import PrunerConfig
from prunekit.criteria.fisher import unit_mask_gradient
from prunekit.errors import ConfigError, SelectionError
from prunekit.masks import PrunedLayer
from prunekit.oneshot.pipeline import to_device
from prunekit.patterns import parse_pattern
from prunekit.patterns.blocks import BlockPattern
from prunekit.selection import select

PRUNING_TYPE = "retrain_free"


@dataclass
class _Layer:
    name: str
    module: nn.Module
    bound: Any
    spec: str
    grads: list[torch.Tensor] = field(default_factory=list)   # per batch, flat [units]

    @property
    def units(self) -> int:
        return self.bound.num_units

    @property
    def unit_size(self) -> int:
        return self.bound.unit_zeros


@dataclass
class RetrainFreeResult:
    """What :func:`retrain_free_prune` did: the masked layers, their Fisher scores and pruned units."""

    model: nn.Module
    layers: list[PrunedLayer]
    fisher: dict[str, torch.Tensor]
    pruned_units: dict[str, list[int]]
    batches: int

    def report(self):
        """The model's sparsity report (see :func:`prunekit.sparsity_report`)."""
        from prunekit.report import sparsity_report

        return sparsity_report(self.model)

    def detach(self, remove_masks: bool = False) -> None:
        """With ``remove_masks``, drop the mask buffers (the zeros stay): needed before :func:`prunekit.slim`."""
        if remove_masks:
            for layer in self.layers:
                layer.detach()


def _check_pruner(cfg: PrunerConfig, index: int) -> BlockPattern:
    if cfg.criterion != PRUNING_TYPE:
        raise ConfigError("pruning_type", cfg.pruning_type, f"allowed here: {PRUNING_TYPE!r}",
                          f"in pruners[{index}]")
    pattern = parse_pattern(cfg.pattern)
    if not (isinstance(pattern, BlockPattern) and pattern.is_channel):
        raise ConfigError("pattern", cfg.pattern, "allowed for retrain_free: a channel pattern, channelxM (input "
                          "channels, e.g. channelx1 on FFN second linears) or Nxchannel (output channels)",
                          f"in pruners[{index}]")
    if cfg.target_sparsity <= 0:
        raise ConfigError("target_sparsity", cfg.target_sparsity, "allowed: a float in (0, 1) for retrain_free",
                          f"in pruners[{index}]")
    return pattern


def _bind_layers(model: nn.Module, cfg: PrunerConfig, pattern: BlockPattern) -> list[_Layer]:
    layers, skipped = [], []
    for cand in select(model, cfg.op_names, cfg.excluded_op_names, cfg.pruning_op_types):
        bound = pattern.bind(cand.module.weight.shape, cand.layout)
        if isinstance(bound, str):
            skipped.append(f"{cand.name}: {bound}")
            continue
        layers.append(_Layer(cand.name, cand.module, bound, pattern.spec))
    if skipped:
        warnings.warn(f"retrain_free: {len(skipped)} layers left dense under pattern {pattern.spec}: {skipped[0]}",
                      stacklevel=3)
    if not layers:
        raise SelectionError(f"retrain_free: no selected layer can be cut into {pattern.spec} units"
                             + (f" ({skipped[0]})" if skipped else ""))
    return layers


def _loss_of(model: nn.Module, batch: Any, loss_func: Callable | None, device: Any) -> torch.Tensor:
    batch = to_device(batch, device)
    if isinstance(batch, Mapping):
        if loss_func is not None:
            raise ConfigError("loss_func", loss_func, "allowed with dict batches: None (their loss is "
                              "model(**batch).loss); loss_func is for (inputs, targets) batches")
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise ConfigError("dataloader", "dict batches without a loss",
                              "allowed: dict batches for which model(**batch).loss exists (include 'labels'), "
                              "or (inputs, targets) batches with loss_func")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        if loss_func is None:
            raise ConfigError("loss_func", None, "allowed: a callable loss_func(model(x), y) for (x, y) batches")
        x, y = batch
        return loss_func(model(x), y)
    raise ConfigError("dataloader", type(batch).__name__, "allowed batches: a dict of model inputs (with labels) "
                      "or an (inputs, targets) pair")


def _fisher_pass(model: nn.Module, layers: list[_Layer], dataloader: Iterable, loss_func: Callable | None,
                 device: Any, progress: bool) -> int:
    """One pass over ``dataloader``: each layer's per-batch unit-mask gradients (weights frozen)."""
    from tqdm.auto import tqdm

    params = list(model.parameters())
    wanted = {id(layer.module.weight) for layer in layers}
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    model.eval()
    count = 0
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        for batch in tqdm(dataloader, total=total, desc="retrain_free fisher", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            loss = _loss_of(model, batch, loss_func, device)
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise ConfigError("loss_func", loss_func, "allowed: a callable returning a scalar tensor")
            loss.backward()
            with torch.no_grad():
                for layer in layers:
                    w = layer.module.weight
                    g = torch.zeros(layer.units) if w.grad is None else \
                        unit_mask_gradient(layer.bound, w, w.grad).reshape(-1).cpu()
                    layer.grads.append(g)
                    w.grad = None
            count += 1
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if count == 0:
        raise ConfigError("dataloader", "empty", "allowed: at least one calibration batch")
    return count


def _counts(layers: list[_Layer], fisher: list[torch.Tensor], cfg: PrunerConfig) -> list[int]:
    """Pruned units per layer: lowest Fisher scores first, globally or per layer, capped per layer."""
    caps = [int(cfg.max_sparsity_ratio_per_op * layer.units) for layer in layers]
    if cfg.pruning_scope == "local":
        return [min(int(round(cfg.target_sparsity * layer.units)), cap) for layer, cap in zip(layers, caps)]
    total = sum(layer.units * layer.unit_size for layer in layers)
    goal = cfg.target_sparsity * total
    scores = torch.cat(fisher)
    owner = torch.cat([torch.full((layer.units,), i, dtype=torch.long) for i, layer in enumerate(layers)])
    counts = [0] * len(layers)
    done = 0
    for unit in scores.argsort(stable=True).tolist():
        i = int(owner[unit])
        size = layers[i].unit_size
        if counts[i] >= caps[i]:
            continue
        if abs(done + size - goal) >= abs(done - goal):  # one more unit would overshoot more than stop short
            break
        counts[i] += 1
        done += size
    return counts


def rearrange(grads: torch.Tensor, fisher: torch.Tensor, p: int) -> torch.Tensor:
    """The ``p`` units to prune from per-batch mask gradients ``grads`` ``[T, units]`` (see the module doc)."""
    order = fisher.argsort(stable=True)
    if p <= 0:
        return order[:0]
    chosen = order[:p].tolist()
    g = grads.to(torch.float64)
    summed = g[:, chosen].sum(dim=1)
    for cand in order[p:].tolist():
        members = chosen + [cand]
        total = summed + g[:, cand]
        cols = g[:, members]
        # ‖total − g_d‖² for each member d: drop the one that leaves the smallest summed-gradient norm
        cost = (total.unsqueeze(1) - cols).square().sum(dim=0)
        drop = int(cost.argmin())
        if members[drop] != cand:
            summed = total - g[:, members[drop]]
            chosen = members[:drop] + members[drop + 1:]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def retrain_free_prune(model: nn.Module, dataloader: Iterable, config: Any, loss_func: Callable | None = None,
                       device: Any = None, progress: bool = True) -> RetrainFreeResult:
    """Prune channels of ``model`` from calibration gradients, without retraining (see the module doc).

    ``config``: a prunekit ``PruningConfig`` / ``WeightPruningConfig`` (any form :func:`prunekit.load_config`
    takes) whose pruners all have ``pruning_type: retrain_free`` and a channel pattern. Returns the masks as
    prunekit masks in a :class:`RetrainFreeResult`.
    """
    cfg: PruningConfig = load_config(config)
    plans = []
    for i, pruner in enumerate(cfg.pruners):          # every check before any work
        plans.append((pruner, _bind_layers(model, pruner, _check_pruner(pruner, i))))
    if dataloader is None:
        raise ConfigError("dataloader", None, "allowed: an iterable of calibration batches (retrain_free runs "
                          "the whole dataloader once)")
    if device is not None:
        model.to(device)
    every = [layer for _, layers in plans for layer in layers]
    names = [layer.name for layer in every]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError("op_names", dup, "allowed: each layer in one retrain_free pruner only")
    batches = _fisher_pass(model, every, dataloader, loss_func, device, progress)

    masked: list[PrunedLayer] = []
    fisher_out: dict[str, torch.Tensor] = {}
    pruned_out: dict[str, list[int]] = {}
    for pruner, layers in plans:
        stacked = [torch.stack(layer.grads) for layer in layers]          # [T, units] each
        fisher = [g.square().sum(dim=0) for g in stacked]
        for layer, g, f, p in zip(layers, stacked, fisher, _counts(layers, fisher, pruner)):
            pruned = rearrange(g, f, p)
            keep = torch.ones(layer.units, dtype=torch.bool)
            keep[pruned] = False
            pl = PrunedLayer(layer.name, layer.module, layer.bound, layer.spec)
            pl.set_mask(keep.to(layer.module.weight.device))
            pl.apply_()
            masked.append(pl)
            fisher_out[layer.name] = f
            pruned_out[layer.name] = pruned.tolist()
            layer.grads.clear()
    return RetrainFreeResult(model, masked, fisher_out, pruned_out, batches)
