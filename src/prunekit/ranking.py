"""Choosing which units to prune: exact lowest-k selection, per layer or across layers, in bounded memory.

Global ranking never concatenates scores. Scores are mapped to order-preserving 32-bit integer keys and the
k-th smallest is found by a three-pass radix select (12 + 12 + 8 bits), each pass a per-layer histogram over
chunks. Per-layer floors and caps (min/max sparsity per op) are honoured inside the same search: it finds the
smallest key τ such that Σ_l clamp(#{scores_l ≤ τ}, lo_l, hi_l) ≥ k (water-filling), so no re-balancing loop is
needed. Ties are broken deterministically: layer order, then index order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

CHUNK = 1 << 22
_PASSES = (12, 12, 8)

#: returns the flat unit scores of one layer (may compute them on demand, e.g. |W| for magnitude)
ScoreSource = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Quota:
    """Units in a layer and the least / most of them that may be pruned."""

    n: int
    lo: int = 0
    hi: int | None = None

    @property
    def cap(self) -> int:
        return self.n if self.hi is None else self.hi


def _keys(scores: torch.Tensor, name: str = "") -> torch.Tensor:
    """Float scores → int64 keys in [0, 2^32) with the same order (−0.0 and +0.0 equal)."""
    x = scores.reshape(-1).float() + 0.0
    if torch.isnan(x).any():
        raise ValueError(f"scores of layer {name!r} contain NaN: training diverged or a gradient is not finite")
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def _chunks(source: ScoreSource, name: str):
    flat = source().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield _keys(flat[start:start + CHUNK], name)


def _radix_select(sources: Sequence[ScoreSource], quotas: Sequence[Quota], k: int,
                  names: Sequence[str]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Smallest key τ with Σ clamp(count_l(≤τ), lo, hi) ≥ k. Returns τ, count(<τ) and count(≤τ) per layer."""
    lo = torch.tensor([q.lo for q in quotas], dtype=torch.int64)
    hi = torch.tensor([q.cap for q in quotas], dtype=torch.int64)
    below = torch.zeros(len(sources), dtype=torch.int64)
    prefix, done = 0, 0
    for width in _PASSES:
        shift = 32 - done - width
        hist = torch.zeros(len(sources), 1 << width, dtype=torch.int64)
        for i, (source, name) in enumerate(zip(sources, names)):
            for keys in _chunks(source, name):
                if done:
                    keys = keys[(keys >> (32 - done)) == prefix]
                hist[i] += torch.bincount((keys >> shift) & ((1 << width) - 1), minlength=1 << width)
        cum = below[:, None] + hist.cumsum(dim=1)
        filled = torch.minimum(torch.maximum(cum, lo[:, None]), hi[:, None]).sum(dim=0)
        digit = int(torch.searchsorted(filled, torch.tensor([k], dtype=torch.int64)).item())
        digit = min(digit, (1 << width) - 1)
        if digit:
            below = below + hist[:, :digit].sum(dim=1)
        last = hist[:, digit]
        prefix = (prefix << width) | digit
        done += width
    return prefix, below, below + last


def _mask_below(source: ScoreSource, name: str, tau: int, ties: int) -> torch.Tensor:
    """Flat bool: keys < τ, plus the first ``ties`` keys equal to τ in index order."""
    parts, taken = [], 0
    for keys in _chunks(source, name):
        part = keys < tau
        if ties > taken:
            eq = keys == tau
            rank = eq.cumsum(dim=0) + taken
            part |= eq & (rank <= ties)
            taken += int(eq.sum())
        parts.append(part)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def lowest(source: ScoreSource, k: int, n: int, name: str = "") -> torch.Tensor:
    """Flat bool with exactly ``k`` True at the lowest scores (ties: lower index first)."""
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    tau, lt, _ = _radix_select([source], [Quota(n)], k, [name])
    return _mask_below(source, name, tau, k - int(lt[0]))


def allocate(sources: Sequence[ScoreSource], quotas: Sequence[Quota], k: int,
             names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Prune ``k`` units in total across layers, lowest scores first, each layer within [lo, hi].

    Returns one flat bool tensor per layer (True = pruned). When the caps make ``k`` unreachable the caps win
    (the caller reports the shortfall); when the floors exceed ``k`` the floors win.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(sources))]
    lo_total = sum(q.lo for q in quotas)
    hi_total = sum(q.cap for q in quotas)
    if k <= lo_total or k >= hi_total:
        counts = [q.lo if k <= lo_total else q.cap for q in quotas]
        return [lowest(s, c, q.n, nm) for s, c, q, nm in zip(sources, counts, quotas, names)]
    tau, lt, le = _radix_select(sources, quotas, k, names)
    base = [min(max(int(a), q.lo), q.cap) for a, q in zip(lt, quotas)]
    upper = [min(max(int(b), q.lo), q.cap) for b, q in zip(le, quotas)]
    remaining = k - sum(base)
    masks = []
    for source, q, name, b, u, a, c in zip(sources, quotas, names, base, upper, lt, le):
        take = min(remaining, u - b)
        remaining -= take
        count = b + take
        if int(a) <= count <= int(c):  # the global threshold decides this layer: no second search
            masks.append(_mask_below(source, name, tau, count - int(a)))
        else:  # held at its floor or cap: its own lowest-count units
            masks.append(lowest(source, count, q.n, name))
    return masks
