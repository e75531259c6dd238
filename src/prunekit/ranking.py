"""Choosing which units to prune: exact lowest-k selection, per layer or across layers, in bounded memory.

Global ranking never concatenates scores. Scores are mapped to order-preserving 32-bit integer keys and the
k-th smallest is found by a three-pass radix select (11 + 11 + 10 bits), each pass a per-layer histogram over
chunks. Per-layer floors and caps (min/max sparsity per op) are honoured inside the same search: it finds the
smallest key τ such that Σ_l clamp(#{scores_l ≤ τ}, lo_l, hi_l) ≥ k (water-filling), so no re-balancing loop is
needed. Ties are broken deterministically: layer order, then index order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from prunekit.kernels import cpu_kernels, radix_hist_

CHUNK = 1 << 24
_POSITIVE_INF_BITS = 0x7F800000  # positive floats above this bit pattern are NaN
_PASSES = (11, 11, 10)

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


def _signed_keys(scores: torch.Tensor, name: str = "") -> tuple[torch.Tensor, bool]:
    """Float scores → (int32 keys with the same order under signed comparison, True when all are known >= 0).

    Non-negative floats already compare like their bit patterns, so the common case (|W|, |W·G|) is a free view;
    negative scores get their magnitude bits flipped.
    """
    x = scores.reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    bits = x.view(torch.int32)
    if x.numel() == 0:
        return bits, True
    low, high = torch.aminmax(bits)  # one pass answers both "any sign bit?" and "any positive NaN?"
    if high > _POSITIVE_INF_BITS or (low < 0 and bool(torch.isnan(x).any())):
        raise ValueError(f"scores of layer {name!r} contain NaN: training diverged or a gradient is not finite")
    if low < 0:  # a sign bit is set (negative scores or -0.0): flip magnitudes, make -0.0 equal +0.0
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        bits = bits.masked_fill(bits == -1, 0)
        return bits, False  # the signed-digit path is right for any keys; no extra pass to find out more
    return bits, True


def _keys(scores: torch.Tensor, name: str = "") -> torch.Tensor:
    """Float scores → int32 keys with the same order (signed comparison)."""
    return _signed_keys(scores, name)[0]


class _Keys:
    """The keys of one layer, chunked; held once per event when small, recomputed per pass when large."""

    def __init__(self, source: ScoreSource, name: str, hold: bool) -> None:
        self.source, self.name = source, name
        self.held: torch.Tensor | None = None
        # non-negative keys (|W|, |W·G|: the common case) need no offset for the signed top digit
        self.held_nonneg = False
        if hold:
            self.held, self.held_nonneg = _signed_keys(source(), name)
        # whether the radix passes run in the CPU kernel, decided once per event (every pass asks): one read of
        # every key per pass beats narrowing to the candidates (a boolean index over every key costs several
        # reads). Keys computed chunk by chunk always take the per-chunk pass (the kernel, or eager when it does
        # not apply). The device is checked first: keys on a GPU never trigger the CPU kernels' build.
        self.in_kernel = self.held is None or (self.held.device.type == "cpu" and cpu_kernels() is not None)
        self._candidates: tuple[int, int, torch.Tensor] | None = None  # (prefix, bits, keys with that prefix)
        self.top: tuple[int, torch.Tensor] | None = None  # (bits, top digits of the held keys) from the first pass

    def chunks(self):
        if self.held is not None:
            yield self.held
            return
        flat = self.source().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            yield _keys(flat[start:start + CHUNK], self.name)

    def with_prefix(self, prefix: int, bits: int) -> torch.Tensor:
        """The held keys whose top ``bits`` bits equal ``prefix``. The narrowed set is kept, so later radix
        passes only touch the candidates, not the whole layer again (the eager path)."""
        if self._candidates is not None and bits > self._candidates[1] \
                and prefix >> (bits - self._candidates[1]) == self._candidates[0]:
            base = self._candidates[2]
        else:
            base = self.held
        if base is self.held and self.top is not None and self.top[0] == bits:
            narrowed = base[self.top[1] == prefix]  # the first pass's digits: no second shift of every key
        else:
            narrowed = base[(base >> (32 - bits)) == prefix]
        self.top = None
        self._candidates = (prefix, bits, narrowed)
        return narrowed


def _hist_pass(row: torch.Tensor, keys: torch.Tensor, done: int, prefix: int, width: int,
               narrowed: bool = False) -> None:
    """``row`` += the histogram of the next ``width``-bit digit of the keys whose top ``done`` bits are
    ``prefix`` (``narrowed``: all of them are). The fused CPU kernel reads every key once; the eager form
    filters first."""
    if not narrowed and radix_hist_(keys, row, done, prefix, width):
        return
    shift, bins = 32 - done - width, 1 << width
    if done:
        if not narrowed:
            keys = keys[(keys >> (32 - done)) == prefix]
        row += torch.bincount((keys >> shift) & (bins - 1), minlength=bins)
    else:  # the top digit is signed: shift it into [0, bins)
        row += torch.bincount((keys >> shift) + (bins >> 1), minlength=bins)


def _radix_select(layers: Sequence[_Keys], quotas: Sequence[Quota], k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Smallest key τ with Σ clamp(count_l(≤τ), lo, hi) ≥ k. Returns τ, count(<τ) and count(≤τ) per layer."""
    lo = torch.tensor([q.lo for q in quotas], dtype=torch.int64)
    hi = torch.tensor([q.cap for q in quotas], dtype=torch.int64)
    below = torch.zeros(len(layers), dtype=torch.int64)
    prefix, done = 0, 0
    for width in _PASSES:
        shift = 32 - done - width
        bins = 1 << width
        hist = torch.zeros(len(layers), bins, dtype=torch.int64)
        for i, layer in enumerate(layers):
            if layer.in_kernel:
                for keys in layer.chunks():
                    _hist_pass(hist[i], keys, done, prefix, width)
            elif done:  # eager, held keys: later passes see only the previous pass's candidates
                _hist_pass(hist[i], layer.with_prefix(prefix, done), done, prefix, width, narrowed=True)
            elif layer.held_nonneg:  # top digits of non-negative keys fill the upper half; kept for pass 2
                top = layer.held >> shift
                layer.top = (width, top)
                hist[i, bins >> 1:] += torch.bincount(top, minlength=bins >> 1)
            else:
                _hist_pass(hist[i], layer.held, done, prefix, width)
        cum = below[:, None] + hist.cumsum(dim=1)
        filled = torch.minimum(torch.maximum(cum, lo[:, None]), hi[:, None]).sum(dim=0)
        digit = min(int(torch.searchsorted(filled, torch.tensor([k], dtype=torch.int64)).item()), bins - 1)
        if digit:
            below = below + hist[:, :digit].sum(dim=1)
        last = hist[:, digit]
        prefix = (digit - (bins >> 1)) if not done else (prefix << width) | digit
        done += width
    return prefix, below, below + last


def _mask_below(layer: _Keys, tau: int, ties: int) -> torch.Tensor:
    """Flat bool: keys < τ, plus the first ``ties`` keys equal to τ in index order."""
    parts, taken = [], 0
    for keys in layer.chunks():
        part = keys < tau
        if ties > taken:
            eq = keys == tau
            rank = eq.cumsum(dim=0) + taken
            part |= eq & (rank <= ties)
            taken += int(eq.sum())
        parts.append(part)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _lowest(layer: _Keys, k: int, n: int) -> torch.Tensor:
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    tau, lt, _ = _radix_select([layer], [Quota(n)], k)
    return _mask_below(layer, tau, k - int(lt[0]))


class Selection:
    """The pruned units of one layer, computed on demand so only one layer's bool tensor exists at a time."""

    def __init__(self, keys: _Keys, n: int, count: int, tau: int | None = None, ties: int = 0) -> None:
        self.keys, self.n, self.count, self.tau, self.ties = keys, n, count, tau, ties

    def mask(self) -> torch.Tensor:
        """Flat bool, True = pruned; exactly ``count`` True."""
        if self.tau is not None:
            return _mask_below(self.keys, self.tau, self.ties)
        return _lowest(self.keys, self.count, self.n)


def lowest(source: ScoreSource, k: int, n: int, name: str = "", hold: bool = True) -> torch.Tensor:
    """Flat bool with exactly ``k`` True at the lowest scores (ties: lower index first)."""
    return _lowest(_Keys(source, name, hold), k, n)


def allocate(sources: Sequence[ScoreSource], quotas: Sequence[Quota], k: int,
             names: Sequence[str] | None = None, hold: bool = True) -> list[Selection]:
    """Prune ``k`` units in total across layers, lowest scores first, each layer within [lo, hi].

    Returns one :class:`Selection` per layer (``.count`` units, ``.mask()`` → flat bool, True = pruned). When
    the caps make ``k`` unreachable the caps win (the caller reports the shortfall); when the floors exceed
    ``k`` the floors win. ``hold`` keeps each layer's keys for the whole call (4 bytes a unit, fastest);
    without it they are recomputed per pass, chunk by chunk, so the extra memory is bounded by one layer.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(sources))]
    layers = [_Keys(s, nm, hold) for s, nm in zip(sources, names)]
    lo_total = sum(q.lo for q in quotas)
    hi_total = sum(q.cap for q in quotas)
    if k <= lo_total or k >= hi_total:
        counts = [q.lo if k <= lo_total else q.cap for q in quotas]
        return [Selection(layer, q.n, c) for layer, q, c in zip(layers, quotas, counts)]
    tau, lt, le = _radix_select(layers, quotas, k)
    base = [min(max(int(a), q.lo), q.cap) for a, q in zip(lt, quotas)]
    upper = [min(max(int(b), q.lo), q.cap) for b, q in zip(le, quotas)]
    remaining = k - sum(base)
    selections = []
    for layer, q, b, u, a, c in zip(layers, quotas, base, upper, lt, le):
        take = min(remaining, u - b)
        remaining -= take
        count = b + take
        if int(a) <= count <= int(c):  # the global threshold decides this layer: no second search
            selections.append(Selection(layer, q.n, count, tau, count - int(a)))
        else:  # held at its floor or cap: its own lowest-count units
            selections.append(Selection(layer, q.n, count))
    return selections
