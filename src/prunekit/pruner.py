"""One Pruner per PrunerConfig: its layers, pattern, criterion and schedule, and what a pruning event does."""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

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


#: the largest step counter a saved state may hold: more optimizer steps than any run takes (a corrupt or
#: hand-edited state is refused rather than silently moving the schedule past its end)
MAX_STEP = 10**12
_STATE_KEYS = ("layers", "masks", "criterion", "last_event_step", "initial_sparsity", "history")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary(value: Any) -> Any:
    """What an error quotes for ``value``: tensors by shape and dtype, never their contents."""
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        return f"dict with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return value


def _check_tensor(key: str, value: Any, shape: tuple[int, ...] | None, dtypes: tuple, why: str,
                  finite: bool = False) -> None:
    """A saved tensor must have the shape and dtype the layer needs (and, for scores, be finite)."""
    ok = isinstance(value, torch.Tensor) and value.dtype in dtypes and (shape is None or tuple(value.shape) == shape)
    if not ok:
        need = f"a {'/'.join(str(d).removeprefix('torch.') for d in dtypes)} tensor"
        raise ConfigError(key, _summary(value), f"allowed: {need}" + (f" of shape {shape}" if shape else "")
                          + (f" {why}" if why else ""))
    if finite and not bool(torch.isfinite(value).all()):
        raise ConfigError(key, f"{_summary(value)} holding inf/NaN", "allowed: finite scores (a diverged run or a "
                                                                    "corrupt file; resume from an earlier state)")


@dataclass(frozen=True)
class Event:
    """What one pruning event did (kept for reports and plots)."""

    step: int
    target: float
    sparsity: float
    seconds: float = 0.0


class Pruner:
    """Prunes the layers selected by one config entry."""

    def __init__(self, model: nn.Module, config: "PrunerConfig", name: str = "pruner0",
                 claim: Callable[[nn.Module], None] | None = None) -> None:
        self.config, self.name = config, name
        self._claim = claim or (lambda module: None)  # called on each selected module before a mask is attached
        self.pattern = parse_pattern(config.pattern)
        if config.reg_type is not None and not isinstance(self.pattern, BlockPattern):
            raise ConfigError("reg_type", config.reg_type, f"group_lasso works on block patterns (NxM, channelxM, "
                                                           f"Nxchannel), not on {config.pattern!r}")
        criterion = CRITERIA.get(config.criterion)
        self.layers, self.skipped = self._bind_layers(model, criterion)
        self.criterion = criterion(low_memory_usage=config.low_memory_usage)
        self.schedule = Schedule(config.start_step, config.end_step, config.pruning_frequency,
                                 min(config.target_sparsity, config.max_sparsity_ratio_per_op),
                                 config.sparsity_decay_type)
        self.progression = self._progression()
        self.initial_sparsity = 0.0
        self.last_event_step: int | None = None
        self.history: list[Event] = []

    def _bind_layers(self, model: nn.Module, criterion: type) -> tuple[list, list[tuple[str, str]]]:
        cfg = self.config
        if isinstance(self.pattern, HeadPattern):
            return head_layers(model, cfg.op_names, cfg.excluded_op_names, cfg.criterion_reduce_type,
                               self._claim), []
        chosen = select(model, cfg.op_names, cfg.excluded_op_names, cfg.pruning_op_types)
        layers, skipped = [], []
        for cand in chosen:
            self._claim(cand.module)
            # a criterion limited to some module types (block_mask: Linear) leaves the others dense
            bound = criterion.module_error(cand.module) or \
                self.pattern.bind(cand.module.weight.shape, cand.layout, cfg.criterion_reduce_type)
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

    def finished(self, step: int) -> bool:
        """Whether no event or progressive phase can change this pruner's masks any more at or after ``step``."""
        if self.progression is not None and self.progression.active:
            return False
        final = self.schedule.final_step
        return not self.layers or step > final or (self.last_event_step is not None and self.last_event_step >= final)

    def ready(self) -> bool:
        return self.criterion.locks or self.criterion.ready

    def wants_gradients(self, step: int) -> bool:
        """Whether step ``step``'s gradients can still influence an event (scores are only read at events)."""
        if not self.criterion.needs_grad or step > self.schedule.final_step or not self.layers:
            return False
        if self.criterion.window_only and step < self.schedule.start_step:
            return False
        offset = step - self.schedule.start_step
        freq = self.schedule.frequency
        next_event = self.schedule.start_step if offset <= 0 else \
            self.schedule.start_step + -(-offset // freq) * freq
        return next_event - step <= self.criterion.horizon

    # --- regularisation --------------------------------------------------------------------------------------
    def regularizes(self, step: int) -> bool:
        """Whether group lasso acts after optimizer step ``step`` (inside [start_step, end_step])."""
        cfg = self.config
        return cfg.reg_type is not None and cfg.reg_coeff > 0.0 and \
            self.schedule.start_step <= step <= self.schedule.end_step

    @torch.no_grad()
    def regularize(self, step: int, lr_of: Callable[[torch.nn.Parameter], float | None]) -> None:
        """Group lasso inside [start_step, end_step]: a proximal shrink of every block by lr · reg_coeff, after
        the optimizer step (the original's gradient-norm version diverged to NaN; this cannot). ``lr_of`` gives
        the learning rate the optimizer used for a weight (None: it does not update it, so nothing shrinks)."""
        if not self.regularizes(step):
            return
        for layer in self.layers:
            lr = lr_of(layer.weight)
            if lr:
                layer.shrink_blocks_(lr * self.config.reg_coeff)

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

    def check_state(self, state: Any, global_step: int, where: str) -> None:
        """Raise ConfigError (naming the key, the value and what is allowed) for anything in ``state`` that
        :meth:`load_state_dict` could not restore exactly; nothing is changed."""
        if not isinstance(state, Mapping):
            raise ConfigError(where, _summary(state), f"allowed: a dict made by {self.name}.state_dict()")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}", "missing", f"allowed: a state with keys {list(_STATE_KEYS)}")
        names = [l.name for l in self.layers]
        if not isinstance(state["layers"], (list, tuple)) or list(state["layers"]) != names:
            raise ConfigError(f"{where}.layers", state["layers"], f"allowed: {names} (the layers this model "
                                                                  f"selects); the config or the model differs")
        if state.get("pattern", self.pattern.spec) != self.pattern.spec:
            raise ConfigError(f"{where}.pattern", state["pattern"], f"allowed: {self.pattern.spec!r} (this "
                                                                    f"config's pattern for layers {names})")
        masks = state["masks"]
        if not isinstance(masks, Mapping) or set(masks) != set(names):
            shown = sorted(masks) if isinstance(masks, Mapping) else _summary(masks)
            raise ConfigError(f"{where}.masks", shown, f"allowed: one bool mask per layer {names}")
        for layer in self.layers:
            need = tuple(layer.mask.shape)
            _check_tensor(f"{where}.masks[{layer.name!r}]", masks[layer.name], need, (torch.bool,),
                          f"(the weight {tuple(layer.weight.shape)} under {self.pattern.spec!r}); the model "
                          "differs from the one saved")
        criterion = state["criterion"]
        scores = criterion.get("scores", {}) if isinstance(criterion, Mapping) else None
        if not isinstance(scores, Mapping) or not set(scores) <= set(names):
            raise ConfigError(f"{where}.criterion.scores", _summary(scores),
                              f"allowed: a dict of score tensors for layers among {names}")
        shapes = {l.name: tuple(l.score_shape) for l in self.layers}
        for name, value in scores.items():
            _check_tensor(f"{where}.criterion.scores[{name!r}]", value, shapes[name], _FLOATS, "", finite=True)
        last = state["last_event_step"]
        if last is not None and not (_is_int(last) and 0 <= last <= global_step):
            raise ConfigError(f"{where}.last_event_step", last, f"allowed: None or an int in [0, {global_step}] "
                                                                "(the saved global_step)")
        initial = state["initial_sparsity"]
        if not (_is_number(initial) and 0.0 <= float(initial) <= 1.0):
            raise ConfigError(f"{where}.initial_sparsity", initial, "allowed: a float in [0, 1]")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(e, (list, tuple)) and len(e) == 4 and _is_int(e[0]) and 0 <= e[0] <= global_step
                and all(_is_number(v) and math.isfinite(v) for v in e[1:]) for e in history):
            raise ConfigError(f"{where}.history", _summary(history),
                              f"allowed: a list of (step <= {global_step}, target, sparsity, seconds) tuples")
        if self.progression is not None and state.get("progression") is not None:
            self._check_progression(state["progression"], global_step, f"{where}.progression")

    def _check_progression(self, state: Any, global_step: int, where: str) -> None:
        keys = ("start", "phase", "new_masks", "orders")
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            raise ConfigError(where, _summary(state), f"allowed: None or a dict with keys {list(keys)}")
        start, phase = state["start"], state["phase"]
        if start is not None and not (_is_int(start) and 0 <= start <= global_step):
            raise ConfigError(f"{where}.start", start, f"allowed: None or an int in [0, {global_step}]")
        if not (_is_int(phase) and 0 <= phase <= self.progression.phases):
            raise ConfigError(f"{where}.phase", phase, f"allowed: an int in [0, {self.progression.phases}]")
        names = [l.name for l in self.layers] if start is not None else []
        for key in ("new_masks", "orders"):
            value = state[key]
            if not isinstance(value, Mapping) or set(value) != set(names):
                raise ConfigError(f"{where}.{key}", _summary(value), f"allowed: one tensor per layer {names}")
        for layer in self.layers if start is not None else []:
            _check_tensor(f"{where}.new_masks[{layer.name!r}]", state["new_masks"][layer.name],
                          tuple(layer.mask.shape), (torch.bool,), "")
            order = state["orders"][layer.name]
            _check_tensor(f"{where}.orders[{layer.name!r}]", order, None, (torch.int64,), "")
            if order.dim() != 1 or (order.numel() and not (0 <= int(order.min()) and int(order.max()) < layer.numel)):
                raise ConfigError(f"{where}.orders[{layer.name!r}]", _summary(order),
                                  f"allowed: a 1-D int64 tensor of element indices in [0, {layer.numel})")

    @torch.no_grad()
    def load_state_dict(self, state: dict, global_step: int | None = None) -> None:
        """Restore :meth:`state_dict` (checked first with :meth:`check_state`: a refused state changes nothing)."""
        self.check_state(state, MAX_STEP if global_step is None else global_step, self.name)
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
