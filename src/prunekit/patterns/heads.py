"""The ``mha`` pattern: whole attention heads (units span the q/k/v rows and output-projection columns)."""
from __future__ import annotations

from typing import Sequence

from prunekit.layouts import WeightLayout
from prunekit.patterns.base import Pattern


class HeadPattern(Pattern):
    """Attention heads. Binds to attention groups found by :mod:`prunekit.slimming`, not to single weights."""

    def __init__(self, spec: str = "mha") -> None:
        self.spec = spec

    def bind(self, shape: Sequence[int], layout: WeightLayout, reduce: str = "mean") -> str:
        return "the mha pattern prunes attention heads; it binds to attention blocks, not to one weight"
