"""Wanda (Sun et al. 2023): prune by ``|W_ij| · ‖X_j‖`` within each output row, weights left unchanged.

Unstructured: every row prunes its lowest scores; the layer total is exactly ``round(sparsity · numel)`` (rows
prune ``⌊total / out⌋`` each and the remainder goes to the rows where one more costs least). N:M: the N lowest
of every M per row. ``use_variant``: one threshold ``α`` for all rows on the row-normalised cumulative sum of
the sorted scores (a row prunes its smallest scores while their sum stays within ``α`` of the row's total); the
original bisected ``α`` until the sparsity was within 0.001 of the target — here the ``α`` that gives exactly the
target count is found directly (the K smallest normalised cumulative sums), so it is exact and bounded.
``dsnot``: refine the mask with DSnoT (:mod:`prunekit.oneshot.methods.dsnot`).
"""
from __future__ import annotations

import torch

from prunekit.oneshot.methods.base import MethodOptions, OneShotMethod, pattern_kind, register_method
from prunekit.oneshot.methods.dsnot import DSNOT_STATS, dsnot_refine
from prunekit.oneshot.methods.magnitude import keep_lowest_pruned
from prunekit.oneshot.stats import InputStats
from prunekit.patterns.base import Pattern


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · sqrt(mean_t x_tj²)`` for a ``[out, in]`` weight (Wanda's metric up to a constant)."""
    return weight.abs() * sq_norm.to(weight.device).sqrt().unsqueeze(0)


def keep_lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning, in every row, its lowest scores; exactly ``round(sparsity · numel)`` in all."""
    rows, cols = scores.shape
    total = int(round(sparsity * scores.numel()))
    base, extra = divmod(total, rows)
    order = scores.argsort(dim=1, stable=True)
    per_row = torch.full((rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        # the remainder goes to the rows whose next-lowest score is smallest
        nxt = scores.gather(1, order[:, base:base + 1]).squeeze(1)
        per_row[nxt.topk(extra, largest=False).indices] += 1
    rank = torch.arange(cols, device=scores.device).unsqueeze(0)
    pruned_sorted = rank < per_row.unsqueeze(1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, ~pruned_sorted)
    return keep


def keep_cumulative_variant(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's variant: prune the entries whose row-normalised cumulative sorted score is among the K lowest.

    Within a row the normalised cumulative sum grows with the rank, so the K lowest form a prefix of every
    row's sorted order: exactly the mask of the threshold ``α`` the original's bisection converges to.
    """
    total = int(round(sparsity * scores.numel()))
    sorted_scores, order = scores.sort(dim=1, stable=True)
    cum = sorted_scores.to(torch.float64).cumsum(dim=1)
    frac = cum / cum[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
    pruned_sorted = torch.zeros_like(scores, dtype=torch.bool)
    if total:
        # equal fractions within a row only follow zero scores, so any tie-break prunes equal scores
        chosen = frac.reshape(-1).topk(total, largest=False).indices
        pruned_sorted.view(-1)[chosen] = True
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, ~pruned_sorted)
    return keep


@register_method
class Wanda(OneShotMethod):
    """Wanda: weight magnitude times input norm, pruned per output row (needs ``sq_norm``)."""

    name = "wanda"

    def stat_kinds(self, options: MethodOptions) -> tuple[str, ...]:
        return DSNOT_STATS if options.dsnot else ("sq_norm",)

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        if stats is None:
            raise ValueError("wanda needs the layer's input statistics ('sq_norm')")
        scores = wanda_scores(weight, stats.sq_norm)
        if pattern_kind(pattern) == "N:M":
            keep = keep_lowest_pruned(scores, sparsity, pattern)
        elif options.use_variant:
            keep = keep_cumulative_variant(scores, sparsity)
        else:
            keep = keep_lowest_per_row(scores, sparsity)
        if options.dsnot:
            keep = dsnot_refine(weight, keep, stats, pattern, options)
        return weight * keep, keep
