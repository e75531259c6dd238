"""N:M patterns: exactly N zeros in every group of M consecutive inputs (e.g. 2:4 for sparse tensor cores)."""
from __future__ import annotations

from typing import Sequence

import torch

from prunekit.kernels import nm_keep, nm_lowest
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
        self.elementwise_mask = True
        # (scores, their version, the eager per-position lists or the kernel's group bit sets)
        self._cache: tuple[torch.Tensor, int, list[torch.Tensor] | torch.Tensor] | None = None
        # groups are runs of M consecutive elements in memory (Linear: in is the last axis): the kernel's layout
        self._flat_groups = layout.in_axis == len(self.shape) - 1
        self.unit_zeros = n
        self.num_units = self.numel // m
        if len(self.shape) == 2:  # element scores: 1x1 tiles
            self.tiles = (self.shape[0], self.shape[1], 1, 1)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        axis = self.layout.in_axis
        return t.unflatten(axis, (t.shape[axis] // self.m, self.m))

    def _cached(self, scores: torch.Tensor) -> list[torch.Tensor] | torch.Tensor | None:
        """What the last ranking of these very scores left (unchanged since): eager lists or kernel bit sets."""
        cached = self._cache
        if cached is not None and cached[0] is scores and cached[1] == scores._version:
            return cached[2]
        return None

    def _lowest_n(self, scores: torch.Tensor, cols: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per position i of the group (a list of M bool tensors): whether element i is among the N lowest
        scores of its group; ties go to the lower index. ``cols``: ``_columns(scores)`` when already made."""
        # an event asks twice for the same scores (unit scores, then the mask): compute once
        cached = self._cached(scores)
        if isinstance(cached, list):
            return cached
        low = self._rank_lowest(scores, cols)
        self._cache = (scores, scores._version, low)
        return low

    def _columns(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The M positions of every group, as M strided views (working on them avoids slow reductions and
        sorts along a short innermost axis)."""
        # one copy to position-major layout makes every later op run on contiguous memory (stride-M views
        # are several times slower)
        return list(self.view(t).movedim(self.group_dim, 0).contiguous().unbind(0))

    def _rank_lowest(self, scores: torch.Tensor, cols: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        g = self.group_dim
        if self.m > 16:
            order = torch.argsort(self.view(scores.float()), dim=g, stable=True)
            low = torch.argsort(order, dim=g) < self.n
            return list(low.unbind(g))
        # small M: rank_i = #{j : s_j < s_i, or s_j == s_i and j < i}. One comparison per pair i < j serves
        # both: s_j < s_i counts for i, its complement (s_i <= s_j) for j; rank_j starts at j (all i < j)
        cols = cols if cols is not None else self._columns(scores.float())
        ranks = [torch.full_like(c, i, dtype=torch.uint8) for i, c in enumerate(cols)]
        for i in range(self.m):
            for j in range(i + 1, self.m):
                below = cols[j] < cols[i]
                ranks[i].add_(below.view(torch.uint8))
                ranks[j].sub_(below.view(torch.uint8))
        return [rank < self.n for rank in ranks]

    def reduce_scores(self, elem: torch.Tensor) -> torch.Tensor:
        return elem

    def _kernel_pick(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Unit scores from the CPU kernel (caching its bit sets for the mask), or None for the eager path."""
        if not self._flat_groups:
            return None
        picked = nm_lowest(scores.float(), self.n, self.m, self.reduce)
        if picked is None:
            return None
        self._cache = (scores, scores._version, picked[1])
        return picked[0]

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        fused = self._kernel_pick(scores)
        if fused is not None:
            return fused
        cols = self._columns(scores.float())
        low = self._lowest_n(scores, cols)
        if self.reduce == "max":
            picked = torch.stack([c.masked_fill(~l, float("-inf")) for c, l in zip(cols, low)]).amax(dim=0)
        else:
            picked = torch.zeros_like(cols[0])
            for c, l in zip(cols, low):
                picked += c * l
            if self.reduce == "mean":
                picked /= self.n
        return picked.reshape(-1)

    def mask_from_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        cached = self._cached(scores)
        if isinstance(cached, torch.Tensor):  # the kernel's bit sets from unit_scores
            self._cache = None
            keep = nm_keep(cached, pruned, self.m)
            if keep is not None:
                return keep.view(self.shape)
        low = self._lowest_n(scores)
        pruned = pruned.reshape(low[0].shape)
        self._cache = None
        keep = torch.stack([~(l & pruned) for l in low], dim=self.group_dim)
        return keep.reshape(self.shape)

    def apply_(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return t.mul_(mask)

    def pruned_units(self, mask: torch.Tensor) -> int:
        cols = self._columns(mask)
        whole = cols[0].clone()
        for c in cols[1:]:
            whole &= c
        return whole.numel() - int(whole.count_nonzero())  # groups with at least one zero

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
