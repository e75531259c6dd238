"""Masks as real module state.

A pruned weight gets a *non-persistent* buffer ``<param>_prune_mask`` on its module: it moves with
``model.to(device)``, survives ``copy.deepcopy`` and ``torch.save(model)``, yet the model's ``state_dict`` keeps
its original keys, so a pruned checkpoint loads into an unpruned model. The pruning object's own
``state_dict`` carries the masks for exact resume. Masks are stored at pattern granularity (one bool per block)
and applied by broadcasting over a view, so block patterns never materialise a full-size mask.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from prunekit.patterns.base import BoundPattern, reduce_dims

MASK_SUFFIX = "_prune_mask"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8, 8 mask entries a byte (flat, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    numel = 1
    for s in shape:
        numel *= s
    bits = (packed.unsqueeze(1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].view(shape)
_PATTERN_ATTR = "_prunekit_patterns"  # module attribute: {param_name: pattern spec}, for reports
_OWNER_ATTR = "_prunekit_owner"  # module attribute: the Pruning whose masks it carries (weakly)


class _OwnerRef:
    """A weak reference to the Pruning that masks a module. It pickles and deep-copies as an empty reference: a
    copy of the model is not driven by that Pruning, and ``torch.save(model)`` / ``deepcopy`` keep working."""

    __slots__ = ("_ref",)

    def __init__(self, owner: object | None = None) -> None:
        self._ref = None if owner is None else weakref.ref(owner)

    def __call__(self) -> object | None:
        return None if self._ref is None else self._ref()

    def __reduce__(self):
        return (_OwnerRef, ())

    def __deepcopy__(self, memo: dict) -> "_OwnerRef":
        return _OwnerRef()


_SCHEDULE_ATTR = "_prunekit_schedule"  # module attribute: {mask buffer: step of the last event, None = finished}


def mark_schedule(module: nn.Module, buffer: str, last_event_step: int | None) -> None:
    """Record whether the schedule behind ``module``'s mask ``buffer`` still runs (the step of its last event) or
    has finished (None: the mask is final and its zeros are in the weight), so that slimming can tell."""
    state = dict(module.__dict__.get(_SCHEDULE_ATTR, {}))
    state[buffer] = last_event_step
    module.__dict__[_SCHEDULE_ATTR] = state


def schedule_state(module: nn.Module) -> dict[str, int | None]:
    """``{mask buffer: last event step or None}`` for the masks whose schedule :func:`mark_schedule` recorded."""
    return dict(module.__dict__.get(_SCHEDULE_ATTR, {}))


def release_masks(module: nn.Module) -> None:
    """Drop every prunekit mask buffer of ``module`` with its bookkeeping (the zeros stay in the weights)."""
    for name in [n for n in module._buffers if n.endswith(MASK_SUFFIX)]:
        del module._buffers[name]
    for attr in (_PATTERN_ATTR, _SCHEDULE_ATTR, _OWNER_ATTR):
        module.__dict__.pop(attr, None)


def set_owner(module: nn.Module, owner: object | None) -> None:
    """Record (or, with None, clear) which Pruning masks ``module``."""
    if owner is None:
        module.__dict__.pop(_OWNER_ATTR, None)
    else:
        module.__dict__[_OWNER_ATTR] = _OwnerRef(owner)


def owner_of(module: nn.Module) -> object | None:
    """The live Pruning whose masks ``module`` carries, or None."""
    ref = module.__dict__.get(_OWNER_ATTR)
    return ref() if isinstance(ref, _OwnerRef) else None


def mask_buffer_name(param_name: str) -> str:
    return param_name + MASK_SUFFIX


def pruned_params(module: nn.Module) -> dict[str, str]:
    """``{param_name: pattern spec}`` of the masked parameters of one module."""
    return dict(getattr(module, _PATTERN_ATTR, {}))


class PrunedLayer:
    """One weight under one pattern: its mask, and the operations the engine performs on it."""

    def __init__(self, name: str, module: nn.Module, bound: BoundPattern, spec: str,
                 param_name: str = "weight", packed: bool = False) -> None:
        self.name, self.module, self.bound, self.param_name = name, module, bound, param_name
        self.buffer = mask_buffer_name(param_name)
        # element-wise masks (1x1, N:M) may be bit-packed: 1 bit a weight instead of 8, unpacked per use
        self.packed = packed and bound.elementwise_mask
        initial = bound.full_mask()
        stored = pack_bits(initial) if self.packed else initial
        existing = getattr(module, self.buffer, None)
        if not isinstance(existing, torch.Tensor) or existing.shape != stored.shape or existing.dtype != stored.dtype:
            module.register_buffer(self.buffer, stored.to(self.weight.device), persistent=False)
        # the mask in the weight's dtype: multiplying by a float tensor is ~3x faster than by a bool one, and
        # this runs on every step; rebuilt whenever the mask, device or dtype changes (not under packing)
        self._multiplier: torch.Tensor | None = None
        self._multiplier_source: torch.Tensor | None = None
        # while a progressive event interpolates, an element-wise keep-mask replaces the block mask
        self._partial: torch.Tensor | None = None
        # nothing pruned yet (warm-up before the first event): the per-step multiplications are skipped
        self._all_kept = bool(self.mask.all())
        # pruned units, when the last writer of the mask knew them (an event's selection): no count pass
        self._pruned_units: int | None = None
        patterns = dict(getattr(module, _PATTERN_ATTR, {}))
        patterns[param_name] = spec
        setattr(module, _PATTERN_ATTR, patterns)

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        # the parameter dict directly: nn.Module.__getattr__ is a slow fallback, and this runs on every step
        param = self.module._parameters.get(self.param_name)
        return param if param is not None else getattr(self.module, self.param_name)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def mask(self) -> torch.Tensor:
        """The keep-mask (bool, ``bound.mask_shape``)."""
        stored = getattr(self.module, self.buffer)
        return unpack_bits(stored, self.bound.mask_shape) if self.packed else stored

    def set_mask(self, mask: torch.Tensor, all_kept: bool | None = None) -> None:
        """Store a keep-mask; ``all_kept``: whether it keeps everything, when the caller already knows."""
        mask = mask.reshape(self.bound.mask_shape)
        getattr(self.module, self.buffer).copy_(pack_bits(mask) if self.packed else mask)
        self._multiplier = None
        self._all_kept = bool(mask.all()) if all_kept is None else all_kept
        self._pruned_units = None

    def set_partial(self, keep: torch.Tensor | None) -> None:
        """Mask element-wise with ``keep`` (weight-shaped bool) until cleared with None."""
        weight = self.weight
        # cast once to the weight's dtype: the step hooks multiply by it on every step of a phase
        self._partial = None if keep is None else keep.to(device=weight.device, dtype=weight.dtype)
        self._multiplier = None

    def _mul_(self, t: torch.Tensor) -> None:
        if self._partial is not None:
            t.mul_(self._partial if self._partial.dtype == t.dtype else self._partial.to(t.dtype))
        elif not self._all_kept:
            self.bound.apply_(t, self.multiplier(t))

    def fused_keep(self) -> tuple[bool, torch.Tensor | None]:
        """Whether the gradient mask can ride along a fused score update, and the keep values to multiply by
        (laid out like the scores; None when nothing is pruned). Not during a progressive phase or with
        bit-packed masks: those take :meth:`mask_grad_`."""
        if self._partial is not None or self.packed:
            return False, None
        return True, None if self._all_kept else self.multiplier(self.weight)

    def multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """The mask ready to multiply ``like`` (a weight-shaped tensor) with."""
        if self.packed:
            return self.mask
        cached = self._multiplier
        stored = getattr(self.module, self.buffer)
        if cached is None or cached.dtype != like.dtype or cached.device != like.device \
                or self._multiplier_source is not stored:
            cached = stored.to(device=like.device, dtype=like.dtype)
            self._multiplier, self._multiplier_source = cached, stored
        return cached

    @property
    def num_units(self) -> int:
        return self.bound.num_units

    @property
    def score_shape(self) -> tuple[int, ...]:
        return self.bound.score_shape

    @property
    def numel(self) -> int:
        return self.bound.numel

    def zeros(self) -> int:
        """Elements the mask zeroes."""
        units = self._pruned_units
        return (self.bound.pruned_units(self.mask) if units is None else units) * self.bound.unit_zeros

    # --- scoring ---------------------------------------------------------------------------------------------
    def reduced_scores(self, term: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
                       buffer: Callable[[torch.Tensor], torch.Tensor], needs_grad: bool,
                       signed: bool = False) -> torch.Tensor | None:
        """``|term(weight, grad, out)|`` reduced to this layer's score granularity (None: no gradient); with
        ``signed`` the term is summed over each unit first and the sum's magnitude taken (a mask gradient).

        ``buffer(like)`` supplies the float32 ``out`` tensor the term is written into.
        """
        weight = self.weight  # callers run under no_grad, so no detach is needed
        grad = weight.grad
        if needs_grad and grad is None:
            return None
        out = term(weight, grad, buffer(weight))
        return self.bound.reduce_sum_abs(out) if signed else self.bound.reduce_abs(out)

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return self.bound.unit_scores(scores)

    def set_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None, count: int | None = None) -> None:
        """Mask the units flagged in ``pruned`` (flat bool; ``count``: how many, when known)."""
        self.set_mask(self.bound.mask_from_pruned_units(pruned.to(self.device), scores),
                      None if count is None else count == 0)
        self._pruned_units = count

    def lock_existing_zeros(self) -> None:
        self.set_mask(self.bound.lock_mask(self.weight))

    # --- masking ---------------------------------------------------------------------------------------------
    def apply_(self) -> None:
        """Zero the pruned weights (through ``.data``, which autograd never records: no ``no_grad`` needed, and
        optimizers that do not keep zeros at zero call this on every step)."""
        self._mul_(self.weight.data)

    def mask_grad_(self) -> None:
        """Zero the gradients of pruned weights, so optimizer state does not build up behind them.

        (No ``no_grad`` needed: a ``.grad`` tensor is never part of a graph, and this runs on every step.)"""
        grad = self.weight.grad
        if grad is not None:
            self._mul_(grad)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero momentum-like optimizer state of pruned weights (e.g. Adam's moments) after an event."""
        for value in optimizer.state.get(self.weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == self.weight.shape:
                self._mul_(value)

    @torch.no_grad()
    def shrink_blocks_(self, threshold: float) -> None:
        """Group-lasso proximal step: each block's weights shrink toward zero by ``threshold`` in L2 norm, and
        a block whose norm is below it becomes exactly zero (w ← w · max(0, 1 − t/‖w_block‖))."""
        view = self.bound.view(self.weight.data)
        norms = reduce_dims(view.square(), self.bound.within, "sum").sqrt_()
        view.mul_((1.0 - threshold / norms.clamp_min(1e-30)).clamp_(min=0.0))

    @property
    def holder(self) -> nn.Module:
        """The module that carries this layer's mask buffer."""
        return self.module

    def detach(self) -> None:
        """Remove the mask buffer (the zeros stay in the weight)."""
        if self.buffer in self.module._buffers:
            del self.module._buffers[self.buffer]
        patterns = dict(getattr(self.module, _PATTERN_ATTR, {}))
        patterns.pop(self.param_name, None)
        setattr(self.module, _PATTERN_ATTR, patterns)
        schedule = self.module.__dict__.get(_SCHEDULE_ATTR)
        if schedule:
            schedule.pop(self.buffer, None)
        if not patterns:
            set_owner(self.module, None)


def drop_masks(module: nn.Module) -> None:
    """Remove every prunekit mask buffer under ``module`` (the zeros stay in the weights)."""
    for sub in module.modules():
        for buffer in [b for b in sub._buffers if b.endswith(MASK_SUFFIX)]:
            del sub._buffers[buffer]
        if hasattr(sub, _PATTERN_ATTR):
            setattr(sub, _PATTERN_ATTR, {})
        sub.__dict__.pop(_SCHEDULE_ATTR, None)
        set_owner(sub, None)
