"""Fisher scores of unit masks (Kwon et al. 2022), the criterion behind ``pruning_type: retrain_free``.

A unit's mask ``m`` multiplies its weights, so ``∂L/∂m = Σ_{unit} W·G`` (signed, summed over the unit's
elements); the empirical Fisher information of the mask is ``Σ_t (∂L_t/∂m)²`` over calibration batches ``t``.
Registered as a criterion so configs name it like any other ``pruning_type``; the one-shot driver
(:mod:`prunekit.oneshot.retrain_free`) adds the global threshold and the mask rearrangement. In the
training-aware engine it simply accumulates the same score over optimizer steps.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from prunekit.criteria.base import GradientCriterion
from prunekit.patterns.base import reduce_dims

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.pruner import PrunedLayer


def unit_mask_gradient(bound, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``∂L/∂m`` of every unit mask of ``bound`` (at ``bound.score_shape``): the unit's sum of ``W·G``."""
    prod = weight.detach().float() * grad.float()
    within = getattr(bound, "within", None)
    if within is None:  # element-wise patterns: the unit is the element
        return prod
    return reduce_dims(bound.view(prod), within, "sum")


class Fisher(GradientCriterion):
    """``Σ_t (Σ_unit W·G)²``, accumulated over every step (no decay)."""

    fused_term = None

    def step_term(self, weight: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(weight, grad, out=out)  # pragma: no cover - accumulate below squares unit sums instead

    @torch.no_grad()
    def accumulate(self, layers: Iterable["PrunedLayer"], mask_grads: bool = False) -> set[int]:
        for layer in layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            term = unit_mask_gradient(layer.bound, layer.weight, grad).square_()
            old = self.scores.get(layer.name)
            if old is None:
                self.scores[layer.name] = term.to(self.score_dtype)
            else:
                old.add_(term.to(old.dtype))
        return set()

    def layer_scores(self, layer: "PrunedLayer") -> torch.Tensor:
        score = self.scores.get(layer.name)
        if score is None:  # never received a gradient: rank it as unimportant
            return torch.zeros(layer.score_shape, device=layer.device)
        return score.float()  # unscaled: a mask's Fisher score is comparable across layers as it is
