"""``block_mask``: the original's learnable block-mask pruner, without rewriting any forward.

The original put a multiplier ``B`` (one value per block, 1 = kept, 0 = pruned) into each Linear's forward,
``y = x · (W ⊙ expand(B))ᵀ + b``, and scored blocks by ``S ← 0.9·S + |∂L/∂B|`` on every step of
[start_step, end_step]. To get ``∂L/∂B`` it replaced ``module.forward``, which broke every Linear with its own
forward (LoRA, quantised linears) until end_step restored it.

The forward is not needed: by the chain rule ``∂L/∂B_b = Σ_{i∈b} W_i · ∂L/∂(W⊙B)_i``. For a kept block
(``B_b = 1``) that is ``Σ_b W·G`` with ``G`` the weight's own gradient; for a pruned block both sides are 0 (its
weights are zero). So the mask gradient is the *signed* block sum of ``W·G``, taken before the magnitude — where
``snip_momentum`` sums ``|W·G|``. The layer stays a plain module the whole time; its keep-mask is prunekit's
ordinary mask buffer and the scores are ordinary criterion state, so checkpoints and resume work as for every
criterion.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.criteria.base import GradientCriterion
from prunekit.patterns import BlockPattern

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.masks import PrunedLayer


class BlockMask(GradientCriterion):
    """S ← 0.9·S + |∂L/∂B| = 0.9·S + |Σ_block W·G|, on steps inside [start_step, end_step]; Linear only."""

    momentum = 0.9
    window_only = True

    @classmethod
    def pattern_error(cls, pattern: Any) -> str | None:
        if isinstance(pattern, BlockPattern):
            return None
        return "block_mask learns one mask value per block: an NxM or channel pattern (e.g. 4x1, channelx1)"

    @classmethod
    def module_error(cls, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return f"block_mask prunes Linear layers only (as the original), not {type(module).__name__}"

    def step_term(self, weight: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(weight, grad, out=out)

    def step_scores(self, layer: "PrunedLayer") -> torch.Tensor | None:
        return layer.reduced_scores(self.step_term, self._buffer, needs_grad=True, signed=True)

    def layer_scores(self, layer: "PrunedLayer") -> torch.Tensor:
        # the mask gradient is a block sum by definition: criterion_reduce_type does not rescale it
        score = self.scores.get(layer.name)
        if score is None:
            return torch.zeros(layer.score_shape, device=layer.device)
        return score.float()
