"""Sparsity over optimizer steps: one-shot (start == end) or iterative with a decay curve.

Events happen at ``start + k·frequency`` for ``k = 0 … T`` with ``T = (end - start) // frequency``; event k
targets ``decay(s0, target, k / T)``. The event at ``start`` itself targets the initial sparsity (a no-op),
and the final event hits ``target`` exactly (the curve is not evaluated there, so rounding never loses a unit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from prunekit.registry import Registry

Decay = Callable[[float, float, float], float]
DECAYS: Registry[Decay] = Registry("sparsity_decay_type")


@DECAYS.register("linear")
def linear(s0: float, s1: float, x: float) -> float:
    """Equal sparsity increments."""
    return s0 + (s1 - s0) * x


@DECAYS.register("cos")
def cos(s0: float, s1: float, x: float) -> float:
    """Slow start, fast finish."""
    return s0 + (s1 - s0) * (1.0 - math.cos(x * math.pi / 2.0))


@DECAYS.register("cube")
def cube(s0: float, s1: float, x: float) -> float:
    """Very slow start (x³, as the original; not Zhu & Gupta's 1-(1-x)³)."""
    return s0 + (s1 - s0) * x**3


@DECAYS.register("exp")
def exp(s0: float, s1: float, x: float) -> float:
    """Density decays geometrically: fast start (the original's default)."""
    if s1 >= 1.0:
        return linear(s0, s1, x)
    return 1.0 - (1.0 - s0) * ((1.0 - s1) / (1.0 - s0)) ** x


@dataclass(frozen=True)
class Schedule:
    """When pruning events happen and which sparsity each one targets."""

    start_step: int
    end_step: int
    frequency: int
    target: float
    decay: str = "exp"

    @property
    def num_increments(self) -> int:
        """T: the number of events after the one at ``start_step`` (0 for one-shot)."""
        return (self.end_step - self.start_step) // self.frequency

    @property
    def oneshot(self) -> bool:
        return self.num_increments == 0

    @property
    def final_step(self) -> int:
        """The step of the last event (may be before end_step when the span is not a multiple of frequency)."""
        return self.start_step + self.num_increments * self.frequency

    def event_index(self, step: int) -> int | None:
        """k if ``step`` is the k-th event step, else None."""
        if step < self.start_step or step > self.final_step:
            return None
        offset = step - self.start_step
        return offset // self.frequency if offset % self.frequency == 0 else None

    def event_steps(self) -> list[int]:
        return list(range(self.start_step, self.final_step + 1, self.frequency))

    def target_at(self, index: int, initial: float = 0.0) -> float:
        """Sparsity targeted by event ``index``; the last event returns ``target`` exactly."""
        total = self.num_increments
        if total == 0 or index >= total:
            return self.target
        value = DECAYS.get(self.decay)(initial, self.target, index / total)
        return min(max(value, initial), self.target)
