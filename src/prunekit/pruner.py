"""One Pruner per PrunerConfig: its layers, pattern, criterion and schedule, and what a pruning event does."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from prunekit.criteria import CRITERIA
from prunekit.errors import ConfigError
from prunekit.masks import PrunedLayer
from prunekit.patterns import BlockPattern, parse_pattern
from prunekit.patterns.heads import HeadPattern, head_layers
from prunekit.progressive import Progression
from prunekit.ranking import Quota, allocate, lowest
from prunekit.schedules import Schedule
from prunekit.selection import select

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.config import PrunerConfig

logger = logging.getLogger("prunekit")

#: below this many units in total, unit scores are computed once per event and held; above it they are
#: recomputed on demand in each ranking pass, so memory stays bounded for very large models
MATERIALIZE_UNITS = 1 << 24


@dataclass(frozen=True)
class Event:
    """What one pruning event did (kept for reports and plots)."""

    step: int
    target: float
    sparsity: float
    seconds: float = 0.0


class Pruner:
    """Prunes the layers selected by one config entry."""

    def __init__(self, model: nn.Module, config: "PrunerConfig", name: str = "pruner0") -> None:
        self.config, self.name = config, name
        self.pattern = parse_pattern(config.pattern)
        if config.reg_type is not None and not isinstance(self.pattern, BlockPattern):
            raise ConfigError("reg_type", config.reg_type, f"group_lasso works on block patterns (NxM, channelxM, "
                                                           f"Nxchannel), not on {config.pattern!r}")
        self.layers, self.skipped = self._bind_layers(model)
        self.criterion = CRITERIA.get(config.criterion)(low_memory_usage=config.low_memory_usage)
        self.schedule = Schedule(config.start_step, config.end_step, config.pruning_frequency,
                                 min(config.target_sparsity, config.max_sparsity_ratio_per_op),
                                 config.sparsity_decay_type)
        self.progression = self._progression()
        self.initial_sparsity = 0.0
        self.last_event_step: int | None = None
        self.history: list[Event] = []

    def _bind_layers(self, model: nn.Module) -> tuple[list, list[tuple[str, str]]]:
        cfg = self.config
        if isinstance(self.pattern, HeadPattern):
            return head_layers(model, cfg.op_names, cfg.excluded_op_names, cfg.criterion_reduce_type), []
        chosen = select(model, cfg.op_names, cfg.excluded_op_names, cfg.pruning_op_types)
        layers, skipped = [], []
        for cand in chosen:
            bound = self.pattern.bind(cand.module.weight.shape, cand.layout, cfg.criterion_reduce_type)
            if isinstance(bound, str):
                skipped.append((cand.name, f"left dense: {bound}"))
                warnings.warn(f"prunekit: {cand.name} left dense under pattern {cfg.pattern}: {bound}",
                              stacklevel=3)
                continue
            layers.append(PrunedLayer(cand.name, cand.module, bound, self.pattern.spec,
                                      packed=cfg.low_memory_usage))
        if not layers and skipped:  # the original left them dense too; Pruning raises if no pruner prunes anything
            warnings.warn(f"prunekit: {self.name} prunes nothing: pattern {cfg.pattern} tiles none of its "
                          f"{len(skipped)} selected layers", stacklevel=3)
        return layers, skipped

    def _progression(self) -> Progression | None:
        cfg, sched = self.config, self.schedule
        if not cfg.progressive or not self.layers:
            return None
        reason = None
        if not isinstance(self.pattern, BlockPattern):
            reason = f"pattern {cfg.pattern!r} is not a block or channel pattern"
        elif min(l.bound.unit_zeros for l in self.layers) < 4:
            reason = f"blocks of pattern {cfg.pattern!r} hold fewer than 4 weights"
        elif sched.frequency == 1 or sched.end_step - sched.start_step <= 4:
            reason = "pruning_frequency is 1 or the pruning window is 4 steps or fewer"
        if reason:  # the original fell back to plain pruning in these cases too; say so
            warnings.warn(f"prunekit: {cfg.pruning_type}: {reason}; running without progressive interpolation",
                          stacklevel=4)
            return None
        phases = min(4, sched.frequency)
        return Progression(phases, sched.frequency // phases)

    # --- schedule --------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether an event (or a progressive phase) is scheduled at ``step`` and has not run yet."""
        if self.last_event_step == step or not self.layers:  # a pruner whose pattern tiles nothing is inert
            return False
        return self.schedule.event_index(step) is not None or (
            self.progression is not None and self.progression.due(step))

    def ready(self) -> bool:
        return self.criterion.locks or self.criterion.ready

    def wants_gradients(self, step: int) -> bool:
        """Whether step ``step``'s gradients can still influence an event (scores are only read at events)."""
        if not self.criterion.needs_grad or step > self.schedule.final_step or not self.layers:
            return False
        offset = step - self.schedule.start_step
        freq = self.schedule.frequency
        next_event = self.schedule.start_step if offset <= 0 else \
            self.schedule.start_step + -(-offset // freq) * freq
        return next_event - step <= self.criterion.horizon

    # --- regularisation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def regularize(self, step: int, lr_of: Callable[[torch.nn.Parameter], float]) -> None:
        """Group lasso inside [start_step, end_step]: a proximal shrink of every block by lr · reg_coeff, after
        the optimizer step (the original's gradient-norm version diverged to NaN; this cannot)."""
        cfg = self.config
        if cfg.reg_type is None or cfg.reg_coeff == 0.0:
            return
        if not self.schedule.start_step <= step <= self.schedule.end_step:
            return
        for layer in self.layers:
            layer.shrink_blocks_(lr_of(layer.weight) * cfg.reg_coeff)

    # --- events ----------------------------------------------------------------------------------------------
    def current_sparsity(self) -> float:
        """Element sparsity of this pruner's layers, as the masks say."""
        return sum(layer.zeros() for layer in self.layers) / max(1, sum(l.numel for l in self.layers))

    @torch.no_grad()
    def prune(self, step: int) -> Event:
        """Run the event scheduled at ``step``: new masks, applied to the weights."""
        began = time.perf_counter()
        index = self.schedule.event_index(step)
        if index is None and self.progression is not None and self.progression.due(step):
            self.last_event_step = step
            self.progression.advance(step, self.layers)
            for layer in self.layers:
                layer.apply_()
            return Event(step, self.history[-1].target if self.history else 0.0, self.current_sparsity(),
                         time.perf_counter() - began)
        if index is None:
            raise RuntimeError(f"{self.name}: no pruning event is scheduled at step {step}")
        self.last_event_step = step
        cfg = self.config
        if self.criterion.locks or (cfg.lock_init_sparsity and step == self.schedule.start_step):
            for layer in self.layers:
                layer.lock_existing_zeros()
            self.initial_sparsity = self.current_sparsity()
        target = self.schedule.target_at(index, self.initial_sparsity)
        # the first event of an iterative schedule targets the initial sparsity: nothing to rank (with a lock,
        # ranking afresh would release locked zeros of layers above the average)
        if self.criterion.locks or (index == 0 and not self.schedule.oneshot):
            target = self.initial_sparsity
        elif target > 0.0:
            old = [layer.mask.clone() for layer in self.layers] if self.progression is not None else None
            self._rank(self.pattern.to_unit_ratio(target))
            if old is not None:
                self.progression.begin(step, self.layers, old)
        for layer in self.layers:
            layer.apply_()
        event = Event(step, target, self.current_sparsity(), time.perf_counter() - began)
        self.history.append(event)
        logger.info("%s step %d: target %.4f, sparsity %.4f", self.name, step, target, event.sparsity)
        return event

    def _hold(self) -> bool:
        return sum(l.num_units for l in self.layers) <= MATERIALIZE_UNITS

    def _sources(self) -> list[Callable[[], torch.Tensor]]:
        crit = self.criterion
        if self._hold():
            held = [l.unit_scores(crit.layer_scores(l)) for l in self.layers]
            return [lambda t=t: t for t in held]
        return [lambda l=l: l.unit_scores(crit.layer_scores(l)) for l in self.layers]

    def _rank(self, unit_target: float) -> None:
        cfg = self.config
        to_units = self.pattern.to_unit_ratio
        lo_ratio = min(to_units(cfg.min_sparsity_ratio_per_op), unit_target)
        hi_ratio = to_units(cfg.max_sparsity_ratio_per_op)
        sources = self._sources()
        hold = self._hold()
        names = [l.name for l in self.layers]
        def cap(layer) -> int:  # head layers keep at least one unit
            return min(round(hi_ratio * layer.num_units), layer.num_units - getattr(layer, "min_keep_units", 0))

        if cfg.pruning_scope == "local":
            ratio = max(unit_target, lo_ratio)
            counts = [min(round(ratio * l.num_units), cap(l)) for l in self.layers]
            pruned = [lambda s=s, l=l, c=c: lowest(s, c, l.num_units, l.name, hold)
                      for s, l, c in zip(sources, self.layers, counts)]
        else:
            quotas = [Quota(l.num_units, min(round(lo_ratio * l.num_units), cap(l)), cap(l)) for l in self.layers]
            k = round(unit_target * sum(q.n for q in quotas))
            selections = allocate(sources, quotas, k, names, hold)
            pruned = [sel.mask for sel in selections]
            counts = [sel.count for sel in selections]
            if sum(counts) < k:
                warnings.warn(f"prunekit: {self.name} cannot reach unit sparsity {unit_target:.4f}: "
                              f"max_sparsity_ratio_per_op={cfg.max_sparsity_ratio_per_op} caps every layer",
                              stacklevel=3)
        for i, layer in enumerate(self.layers):
            # N:M chooses *which* N of each group from element scores; block masks need no scores
            scores = self.criterion.layer_scores(layer) if layer.bound.needs_scores_for_mask else None
            layer.set_pruned_units(pruned[i](), scores, counts[i])  # one layer's selection in memory at a time

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "pattern": self.pattern.spec,
            "layers": [l.name for l in self.layers],
            "masks": {l.name: l.mask.clone() for l in self.layers},
            "criterion": self.criterion.state_dict(),
            "last_event_step": self.last_event_step,
            "initial_sparsity": self.initial_sparsity,
            "history": [(e.step, e.target, e.sparsity, e.seconds) for e in self.history],
            "progression": self.progression.state_dict() if self.progression is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        names = [l.name for l in self.layers]
        if list(state["layers"]) != names:
            raise ValueError(f"{self.name}: the saved pruning state covers layers {state['layers']}, "
                             f"this model selects {names}; the config or the model differs")
        if state.get("pattern", self.pattern.spec) != self.pattern.spec:
            raise ValueError(f"{self.name}: the saved pruning state of layers {names} was made with pattern "
                             f"{state['pattern']!r}; this config uses {self.pattern.spec!r}")
        for layer in self.layers:
            saved = tuple(state["masks"][layer.name].shape)
            if saved != tuple(layer.bound.mask_shape):
                raise ValueError(f"{self.name}: layer {layer.name!r} has a saved mask of shape {saved}, but its "
                                 f"weight {tuple(layer.weight.shape)} under {self.pattern.spec!r} needs "
                                 f"{tuple(layer.bound.mask_shape)}; the model differs from the one saved")
        for layer in self.layers:
            layer.set_mask(state["masks"][layer.name].to(layer.device))
            layer.apply_()
        self.criterion.load_state_dict(state["criterion"])
        self.last_event_step = state["last_event_step"]
        self.initial_sparsity = state["initial_sparsity"]
        self.history = [Event(*e) for e in state["history"]]
        if self.progression is not None and state.get("progression") is not None:
            self.progression.load_state_dict(state["progression"], self.layers)
            for layer in self.layers:
                layer.apply_()
