"""N:M patterns: exactly N zeros in every group of M consecutive inputs (e.g. 2:4 for sparse tensor cores)."""
from __future__ import annotations

from typing import Sequence

import torch

from prunekit.layouts import WeightLayout
from prunekit.patterns.base import BoundPattern, Pattern, reduce_dims


class NMBound(BoundPattern):
    """N:M bound to one weight. Masks and scores are element-wise (which N of each M is the information)."""

    def __init__(self, shape: Sequence[int], layout: WeightLayout, reduce: str, n: int, m: int) -> None:
        super().__init__(shape, layout, reduce)
        self.n, self.m = n, m
        self.group_dim = layout.in_axis + 1  # the within-group axis once `in` is split into (groups, M)
        self.mask_shape = self.score_shape = self.shape
        self.needs_scores_for_mask = True
        self.unit_zeros = n
        self.num_units = self.numel // m

    def view(self, t: torch.Tensor) -> torch.Tensor:
        axis = self.layout.in_axis
        return t.unflatten(axis, (t.shape[axis] // self.m, self.m))

    def _lowest_n(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool (split view): the N lowest-scoring elements of every group; ties go to the lower index."""
        v = self.view(scores.float())
        order = torch.argsort(v, dim=self.group_dim, stable=True)
        ranks = torch.argsort(order, dim=self.group_dim)
        return ranks < self.n

    def reduce_scores(self, elem: torch.Tensor) -> torch.Tensor:
        return elem

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        v = self.view(scores.float())
        lowest = torch.sort(v, dim=self.group_dim, stable=True).values.narrow(self.group_dim, 0, self.n)
        return reduce_dims(lowest, (self.group_dim,), self.reduce).reshape(-1)

    def mask_from_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        low = self._lowest_n(scores)
        group_shape = list(low.shape)
        group_shape[self.group_dim] = 1
        prune = low & pruned.reshape(group_shape)
        return (~prune).reshape(self.shape)

    def apply_(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return t.mul_(mask)

    def pruned_units(self, mask: torch.Tensor) -> int:
        return int(self.view(~mask).any(dim=self.group_dim).sum())

    def lock_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """Existing zeros stay zero."""
        return weight.detach() != 0

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        return mask


class NMPattern(Pattern):
    """``N:M``: N zeros in each M consecutive input weights."""

    def __init__(self, spec: str, n: int, m: int) -> None:
        self.spec, self.n, self.m = spec, n, m
        self.max_sparsity = n / m
        self.unit_fraction = n / m

    def bind(self, shape: Sequence[int], layout: WeightLayout, reduce: str = "mean") -> NMBound | str:
        inn = shape[layout.in_axis]
        if inn % self.m:
            return f"weight of shape {tuple(shape)} has {inn} input columns, not divisible into groups of {self.m}"
        return NMBound(shape, layout, reduce, self.n, self.m)
