"""Magnitude: the baseline, |W| alone (no calibration statistics)."""
from __future__ import annotations

import torch

from prunekit.errors import ConfigError
from prunekit.oneshot.methods.base import MethodOptions, OneShotMethod, pattern_kind, register_method
from prunekit.oneshot.methods.dsnot import DSNOT_STATS, dsnot_refine
from prunekit.oneshot.stats import InputStats
from prunekit.patterns.base import Pattern


def keep_lowest_pruned(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask pruning the lowest ``scores``: over the whole layer for 1x1, the N lowest of each M for N:M."""
    if pattern_kind(pattern) == "N:M":
        n, m = pattern.n, pattern.m
        if scores.shape[1] % m:
            raise ConfigError("pattern", pattern.spec, f"allowed: M dividing the layer's {scores.shape[1]} inputs")
        groups = scores.reshape(scores.shape[0], -1, m)
        drop = groups.topk(n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(scores.shape)
    k = int(round(sparsity * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[scores.reshape(-1).topk(k, largest=False).indices] = False
    return keep.view(scores.shape)


@register_method
class Magnitude(OneShotMethod):
    name = "magnitude"

    def stat_kinds(self, options: MethodOptions) -> tuple[str, ...]:
        # magnitude alone needs no calibration; its mask refined by DSnoT does
        return DSNOT_STATS if options.dsnot else ()

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        keep = keep_lowest_pruned(weight.abs(), sparsity, pattern)
        if options.dsnot:
            if stats is None:
                raise ValueError("magnitude with dsnot needs the layer's input statistics (sq_norm, mean, var)")
            keep = dsnot_refine(weight, keep, stats, pattern, options)
        return weight * keep, keep
