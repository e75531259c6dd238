"""Which head counts grouped-query attention can be cut to, and which heads a cut keeps.

With ``H`` query heads reading ``G`` key/value heads (``R = H / G`` per group), a legal result keeps ``g`` whole
groups (``1 <= g <= G``) and ``r`` query heads in each (``1 <= r <= R``): every group stays non-empty and all
groups stay the same size, so ``num_heads = g * r`` and ``num_key_value_heads = g`` describe it and the config
stays valid. Plain multi-head attention is ``G = H`` (``r = 1``), where every count is legal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prunekit.errors import ConfigError

HEAD_CUTS = ("auto", "kv-groups", "query-heads")


@dataclass(frozen=True)
class HeadShape:
    """A legal attention shape: ``groups`` key/value heads with ``per_group`` query heads each."""

    groups: int
    per_group: int

    @property
    def heads(self) -> int:
        return self.groups * self.per_group


def legal_shapes(num_heads: int, num_kv_heads: int) -> list[HeadShape]:
    """Every legal (groups, per_group) for ``num_heads`` / ``num_kv_heads``, most heads first."""
    per = num_heads // num_kv_heads
    shapes = [HeadShape(g, r) for g in range(1, num_kv_heads + 1) for r in range(1, per + 1)]
    return sorted(shapes, key=lambda s: (-s.heads, s.groups))


def legal_sparsities(num_heads: int, num_kv_heads: int) -> list[tuple[float, int]]:
    """(head sparsity, heads kept) for every legal kept count, dense first."""
    counts = sorted({s.heads for s in legal_shapes(num_heads, num_kv_heads)}, reverse=True)
    return [(round(1 - k / num_heads, 3), k) for k in counts]


def kept_heads(num_heads: int, sparsity: float) -> int:
    """The head count a sparsity asks for: ``round((1 - sparsity) * num_heads)``."""
    return int(round((1.0 - sparsity) * num_heads))


def shapes_for(num_heads: int, num_kv_heads: int, sparsity: float, cut: str = "auto",
               key: str = "head_sparsity") -> list[HeadShape]:
    """The legal shapes keeping ``kept_heads(num_heads, sparsity)`` heads; ConfigError naming legal values."""
    if cut not in HEAD_CUTS:
        raise ConfigError("head_cut", cut, f"allowed: {', '.join(HEAD_CUTS)}")
    want = kept_heads(num_heads, sparsity)
    per = num_heads // num_kv_heads
    allowed = legal_shapes(num_heads, num_kv_heads)
    if cut == "kv-groups":
        allowed = [s for s in allowed if s.per_group == per]
    elif cut == "query-heads":
        allowed = [s for s in allowed if s.groups == num_kv_heads]
    shapes = [s for s in allowed if s.heads == want]
    if not shapes:
        counts = sorted({s.heads for s in allowed}, reverse=True)
        listed = ", ".join(f"{round(1 - k / num_heads, 3):g} ({k} kept)" for k in counts)
        how = "" if cut == "auto" else f" with head cut {cut!r}"
        raise ConfigError(key, sparsity, f"allowed for {num_heads} query / {num_kv_heads} key-value heads{how}: "
                          f"{listed}", f"it asks to keep {want} heads, which "
                          + ("empties the attention block" if want < 1 else "no legal cut gives"))
    return shapes


def keep_for_shape(scores: torch.Tensor, num_kv_heads: int, shape: HeadShape) -> tuple[list[int], list[int], float]:
    """Kept query heads, kept key/value heads and the removed score for one layer cut to ``shape``.

    Inside each group the ``per_group`` best query heads stay; the ``groups`` groups whose kept heads score
    highest stay. Ties go to the lower index, so the choice is deterministic.
    """
    per = scores.numel() // num_kv_heads
    best_in_group: list[tuple[float, int, list[int]]] = []
    for g in range(num_kv_heads):
        heads = list(range(g * per, (g + 1) * per))
        top = sorted(heads, key=lambda h: (-float(scores[h]), h))[: shape.per_group]
        best_in_group.append((sum(float(scores[h]) for h in top), g, sorted(top)))
    chosen = sorted(best_in_group, key=lambda t: (-t[0], t[1]))[: shape.groups]
    keep_kv = sorted(g for _, g, _ in chosen)
    keep = sorted(h for _, _, hs in chosen for h in hs)
    removed = float(scores.sum()) - sum(float(scores[h]) for h in keep)
    return keep, keep_kv, removed


def choose_shape(layer_scores: Sequence[torch.Tensor], num_kv_heads: int,
                 shapes: Sequence[HeadShape]) -> HeadShape:
    """The shape (same for every layer) that removes the least total score; ties: fewer parameters kept."""
    def cost(shape: HeadShape) -> tuple[float, int]:
        return (sum(keep_for_shape(s, num_kv_heads, shape)[2] for s in layer_scores), shape.groups)

    return min(shapes, key=cost)
