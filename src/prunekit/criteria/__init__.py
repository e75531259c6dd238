"""Criteria registry: ``CRITERIA.get("snip_momentum")`` → the criterion class.

Adding a criterion means writing one class with ``layer_scores`` (and ``step_term`` for gradient-based ones)
and registering it here.
"""
from __future__ import annotations

import torch

from prunekit.criteria.base import Criterion, GradientCriterion
from prunekit.criteria.block_mask import BlockMask
from prunekit.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("pruning_type")


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """|W|, computed at each pruning event (nothing is stored between events)."""

    @torch.no_grad()
    def layer_scores(self, layer) -> torch.Tensor:
        # a fresh buffer per layer: an event may hold every layer's scores at once
        fresh = lambda like: torch.empty(like.shape, dtype=torch.float32, device=like.device)  # noqa: E731
        return self.scaled(layer, layer.reduced_scores(lambda w, g, out: out.copy_(w), fresh, needs_grad=False))


@CRITERIA.register("gradient")
class Gradient(GradientCriterion):
    """|G| of the latest optimizer step."""

    fused_term = False

    def step_term(self, weight: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(grad)


@CRITERIA.register("snip")
class Snip(GradientCriterion):
    """|W·G| of the latest optimizer step (Lee et al., 2019)."""

    fused_term = True

    def step_term(self, weight: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(weight, grad, out=out)


@CRITERIA.register("snip_momentum")
class SnipMomentum(Snip):
    """S ← 0.9·S + |W·G| every optimizer step (the original's default)."""

    momentum = 0.9


@CRITERIA.register("pattern_lock")
class PatternLock(Criterion):
    """Keep the zeros a model already has (fine-tuning a pre-sparsified model); prunes nothing new."""

    locks = True

    def layer_scores(self, layer) -> torch.Tensor:  # pragma: no cover - the pruner never ranks a lock
        raise RuntimeError("pattern_lock does not rank units")


CRITERIA.register("block_mask")(BlockMask)  # the original's learnable block mask, see criteria/block_mask.py

from prunekit.criteria.fisher import Fisher  # noqa: E402  (needs CRITERIA's base classes only)

CRITERIA.register("retrain_free")(Fisher)


@CRITERIA.register("sparse_gpt")
class CalibrationOnly(Criterion):
    """A pruning_type that runs once over calibration data (``prepare_pruning(..., dataloader=)``, prunekit.compat),
    never step by step in a training loop; registered so configs naming it validate."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        from prunekit.errors import ConfigError

        raise ConfigError("pruning_type", "sparse_gpt", "runs one-shot over calibration data: "
                          "prunekit.compat.prepare_pruning(model, config, dataloader=...) or prunekit.oneshot(...)")

    def layer_scores(self, layer) -> torch.Tensor:  # pragma: no cover - never constructed
        raise RuntimeError("sparse_gpt does not rank units in training")


__all__ = ["CRITERIA", "BlockMask", "CalibrationOnly", "Criterion", "Fisher", "Gradient", "GradientCriterion",
           "Magnitude", "PatternLock", "Snip", "SnipMomentum"]
