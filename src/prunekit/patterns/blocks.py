"""NxM block patterns and whole-channel patterns (``channelxM``, ``Nxchannel``).

A block is N consecutive output rows × M consecutive input columns. For convolutions a block of two integers
sits at one kernel tap (the original's channels-last semantics), while channel patterns span every tap, so
``channelx1`` removes whole input channels and ``1xchannel`` whole filters — prunable for real.
"""
from __future__ import annotations

from typing import Sequence

import torch

from prunekit.layouts import WeightLayout
from prunekit.patterns.base import BoundPattern, Pattern, reduce_dims


class BlockBound(BoundPattern):
    """A block pattern bound to one weight. The mask has one bool per block."""

    def __init__(self, shape: Sequence[int], layout: WeightLayout, reduce: str,
                 rows: int, cols: int, per_tap: bool) -> None:
        super().__init__(shape, layout, reduce)
        split: list[int] = []
        within: list[int] = []
        unit_zeros = 1
        for axis, size in enumerate(self.shape):
            if axis in (layout.out_axis, layout.in_axis):
                block = rows if axis == layout.out_axis else cols
                split += [size // block, block]
                within.append(len(split) - 1)
                unit_zeros *= block
            else:
                split.append(size)
                if not per_tap:
                    within.append(len(split) - 1)
                    unit_zeros *= size
        self._blocks = sorted(((layout.out_axis, rows), (layout.in_axis, cols)), reverse=True)
        self.split_shape = tuple(split)
        self.within = tuple(within)
        self.mask_shape = tuple(1 if k in within else s for k, s in enumerate(split))
        self.score_shape = self.mask_shape
        self.unit_zeros = unit_zeros
        self.num_units = self.numel // unit_zeros
        self.elementwise_mask = unit_zeros == 1
        # the step path sums a block; the division of a mean waits for the event (see score_scale)
        self._how = "sum" if reduce == "mean" else reduce
        self.score_scale = 1.0 / unit_zeros if reduce == "mean" else 1.0
        if len(self.shape) == 2 and self._how == "sum":
            tile = dict(self._blocks)
            self.tiles = (self.shape[0], self.shape[1], tile[0], tile[1])

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """Split the out and in axes into (blocks, block size); always a view, whatever the memory format."""
        if t.is_contiguous():  # the common case, one call (this runs for every layer on every step)
            return t.view(self.split_shape)
        for axis, block in self._blocks:  # highest axis first, so lower axis indices stay valid
            t = t.unflatten(axis, (t.shape[axis] // block, block))
        return t

    def reduce_scores(self, elem: torch.Tensor) -> torch.Tensor:
        return reduce_dims(self.view(elem), self.within, self._how)

    def reduce_sum_abs(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_dims(self.view(x), self.within, "sum").abs_()

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.reshape(-1)

    def mask_from_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        return (~pruned).reshape(self.mask_shape)

    def apply_(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.view(t).mul_(mask)
        return t

    def pruned_units(self, mask: torch.Tensor) -> int:
        return mask.numel() - int(mask.count_nonzero())

    def lock_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """Keep every block that holds a non-zero; lock the all-zero ones."""
        return self.view(weight.detach() != 0).amax(dim=self.within, keepdim=True)

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        return self.view(torch.ones(self.shape, dtype=torch.bool)).logical_and(mask).reshape(self.shape)


class BlockPattern(Pattern):
    """``NxM`` (``rows``×``cols``), ``channelxM`` (rows=None: all rows) or ``Nxchannel`` (cols=None)."""

    def __init__(self, spec: str, rows: int | None, cols: int | None) -> None:
        self.spec, self.rows, self.cols = spec, rows, cols

    @property
    def is_channel(self) -> bool:
        return self.rows is None or self.cols is None

    def bind(self, shape: Sequence[int], layout: WeightLayout, reduce: str = "mean") -> BlockBound | str:
        out, inn = shape[layout.out_axis], shape[layout.in_axis]
        rows = self.rows or out
        cols = self.cols or inn
        if out % rows or inn % cols:
            return (f"weight of shape {tuple(shape)} has {out} output rows and {inn} input columns, "
                    f"not divisible into {rows}x{cols} blocks")
        return BlockBound(shape, layout, reduce, rows, cols, per_tap=not self.is_channel)
