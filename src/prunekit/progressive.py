"""Progressive pruning (``*_progressive``): a structured event's newly pruned weights go to zero over several steps.

At each event the new block masks are computed as usual, but instead of zeroing every newly pruned block at once,
the newly pruned *elements* are ordered by magnitude and zeroed in ``phases`` slices, ``period`` steps apart (the
lowest first); the last phase applies the full structured mask. Between phases the layer is masked element-wise.
This softens the jump a channel or block pattern makes at every event (the original's ``progressive`` pruner).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch


class Progression:
    """The interpolation state of one pruner between an event and its last phase."""

    def __init__(self, phases: int, period: int) -> None:
        self.phases, self.period = phases, period
        self.start: int | None = None  # step of the event being interpolated
        self.phase = 0
        self.new_masks: dict[str, torch.Tensor] = {}
        self.orders: dict[str, torch.Tensor] = {}  # flat indices of newly pruned elements, lowest |w| first

    @property
    def active(self) -> bool:
        return self.start is not None

    def next_step(self) -> int | None:
        return None if self.start is None else self.start + self.phase * self.period

    def due(self, step: int) -> bool:
        return self.active and step == self.next_step()

    @torch.no_grad()
    def begin(self, step: int, layers: Sequence[Any], old_masks: Sequence[torch.Tensor]) -> None:
        """Called right after ``layers`` received their new masks: keep those for the last phase, put the old
        ones back, and zero the first slice of what is newly pruned."""
        self.start, self.phase = step, 0
        self.new_masks, self.orders = {}, {}
        for layer, old in zip(layers, old_masks):
            new = layer.mask.clone()
            newly = (layer.bound.expand(old) & ~layer.bound.expand(new)).reshape(-1).nonzero().flatten()
            magnitude = layer.weight.detach().reshape(-1)[newly].abs()
            self.new_masks[layer.name] = new
            self.orders[layer.name] = newly[torch.argsort(magnitude, stable=True)]
            layer.set_mask(old)
        self._advance(layers)

    @torch.no_grad()
    def advance(self, step: int, layers: Sequence[Any]) -> None:
        """Run the phase due at ``step``."""
        if not self.due(step):
            raise RuntimeError(f"no progressive phase is due at step {step}")
        self._advance(layers)

    def _advance(self, layers: Sequence[Any]) -> None:
        self.phase += 1
        if self.phase >= self.phases:  # the last phase: the structured masks themselves
            for layer in layers:
                layer.set_partial(None)
                layer.set_mask(self.new_masks[layer.name])
            self.start, self.new_masks, self.orders = None, {}, {}
            return
        self._apply_partial(layers)

    def _apply_partial(self, layers: Sequence[Any]) -> None:
        for layer in layers:
            order = self.orders[layer.name]
            count = math.ceil(len(order) * self.phase / self.phases)
            keep = layer.bound.expand(layer.mask).clone().reshape(-1)
            keep[order[:count]] = False
            layer.set_partial(keep.view(layer.bound.shape))

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "phase": self.phase,
                "new_masks": {k: v.clone() for k, v in self.new_masks.items()},
                "orders": {k: v.clone() for k, v in self.orders.items()}}

    def load_state_dict(self, state: dict[str, Any], layers: Sequence[Any]) -> None:
        self.start, self.phase = state["start"], state["phase"]
        self.new_masks = {k: v.clone() for k, v in state["new_masks"].items()}
        self.orders = {k: v.clone() for k, v in state["orders"].items()}
        if self.active:
            self._apply_partial(layers)
        else:
            for layer in layers:
                layer.set_partial(None)
