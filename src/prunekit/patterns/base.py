"""The pattern interface: how a weight is cut into ranking *units* and how a unit mask is applied.

A :class:`Pattern` is parsed from a config string (``"4x1"``, ``"2:4"`` …). Binding it to one weight gives a
:class:`BoundPattern`, which knows that weight's shape and answers everything the engine asks:
how many units there are, how element scores are reduced to the granularity a criterion stores, which units
score lowest, and how to multiply a weight (or its gradient, or optimizer state) by the mask.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from prunekit.layouts import WeightLayout

def _reduce_one(t: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    size = t.shape[dim]
    if size > 16 or t.stride(dim) != 1:
        return t.amax(dim=dim, keepdim=True) if how == "max" else t.sum(dim=dim, keepdim=True)
    # a short innermost axis: adding its slices is several times faster than the reduction kernel on CPU
    out = t.select(dim, 0).clone()
    for i in range(1, size):
        if how == "max":
            torch.maximum(out, t.select(dim, i), out=out)
        else:
            out += t.select(dim, i)
    return out.unsqueeze(dim)


def reduce_dims(t: torch.Tensor, dims: Sequence[int], how: str) -> torch.Tensor:
    """Reduce ``t`` over ``dims`` (keeping them as size 1) with ``mean``, ``sum`` or ``max``."""
    count = 1
    for d in sorted(dims, reverse=True):
        if t.shape[d] > 1:  # size-1 axes need no pass (1x1 keeps the view)
            count *= t.shape[d]
            t = _reduce_one(t, d, how)
    return t.div_(count) if how == "mean" and count > 1 else t


class BoundPattern(ABC):
    """A pattern bound to one weight shape. Masks are bool, True = keep."""

    #: number of ranking units (blocks, N:M groups, channels, heads)
    num_units: int
    #: shape of the stored mask tensor
    mask_shape: tuple[int, ...]
    #: shape of the scores a criterion stores for this weight
    score_shape: tuple[int, ...]
    #: whether mask_from_pruned_units needs the stored scores (N:M picks which N of each group)
    needs_scores_for_mask: bool = False
    #: whether the mask has one entry per weight element (1x1, N:M), so bit-packing it pays
    elementwise_mask: bool = False
    #: stored scores times this are the scores the config's reduce type asks for: a ``mean`` is accumulated as
    #: a sum and divided once per event, not once per step (it is the same number up to rounding)
    score_scale: float = 1.0
    #: (rows, cols, tile rows, tile cols) when the stored scores are plain tile *sums* of a 2-D weight read as a
    #: (rows, cols) matrix, laid out as a (rows / tile rows, cols / tile cols) matrix: the fused CPU kernel
    #: (prunekit.kernels) can then update them in one pass. None: only the eager path applies.
    tiles: tuple[int, int, int, int] | None = None

    def __init__(self, shape: Sequence[int], layout: WeightLayout, reduce: str) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.layout = layout
        self.reduce = reduce
        self.numel = 1
        for s in self.shape:
            self.numel *= s

    @abstractmethod
    def reduce_scores(self, elem: torch.Tensor) -> torch.Tensor:
        """Element scores (weight-shaped) → the granularity a criterion accumulates (``score_shape``), before
        the :attr:`score_scale` factor."""

    def reduce_abs(self, x: torch.Tensor) -> torch.Tensor:
        """``reduce_scores(|x|)``, to be multiplied by :attr:`score_scale`; ``x`` is a scratch tensor that may be
        overwritten."""
        return self.reduce_scores(x.abs_())

    def reduce_sum_abs(self, x: torch.Tensor) -> torch.Tensor:
        """``|Σ x|`` over each unit (the gradient of a per-unit mask multiplier, when ``x`` is W·G), at
        ``score_shape``; ``x`` may be overwritten. Only patterns whose units are blocks have it."""
        raise NotImplementedError(f"{type(self).__name__} has no per-unit sum")

    @abstractmethod
    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Stored scores → one float per unit, flat (lower = pruned first)."""

    @abstractmethod
    def mask_from_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Flat bool of pruned units (+ the stored scores, for within-unit choices) → keep-mask."""

    @abstractmethod
    def apply_(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multiply a weight-shaped tensor in place by the mask (no full-size mask is materialised)."""

    @abstractmethod
    def pruned_units(self, mask: torch.Tensor) -> int:
        """How many units the mask prunes."""

    @abstractmethod
    def lock_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """A mask that keeps the existing zeros of ``weight`` zero (lock-in of a pre-sparsified model)."""

    @abstractmethod
    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask at full weight shape (reporting and tests only; never on the training path)."""

    #: elements zeroed when one unit is pruned
    unit_zeros: int

    def full_mask(self) -> torch.Tensor:
        """An all-keep mask."""
        return torch.ones(self.mask_shape, dtype=torch.bool)

    def element_sparsity(self, mask: torch.Tensor) -> float:
        """Fraction of the weight's elements the mask zeroes."""
        return self.pruned_units(mask) * self.unit_zeros / self.numel


class Pattern(ABC):
    """A parsed pattern string. ``bind`` checks the shape and returns a BoundPattern or a reason string."""

    spec: str
    #: the largest element sparsity this pattern can express (N/M for N:M)
    max_sparsity: float = 1.0
    #: how many elements a unit holds relative to its zeros: an element target t means t / unit_fraction units
    unit_fraction: float = 1.0

    @abstractmethod
    def bind(self, shape: Sequence[int], layout: WeightLayout, reduce: str = "mean") -> BoundPattern | str:
        """Bind to a weight shape; return a human-readable reason instead when the shape cannot be tiled."""

    def to_unit_ratio(self, element_ratio: float) -> float:
        """Convert an element sparsity target into a fraction of units."""
        return min(1.0, element_ratio / self.unit_fraction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
