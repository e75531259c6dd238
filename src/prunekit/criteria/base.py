"""The criterion interface: a criterion scores units (lower = pruned first).

Scores are kept at the granularity the pattern asks for (one value per block for NxM, per element for N:M), so
block patterns never hold full-size score tensors. ``accumulate`` is called once per *optimizer* step, after
gradients are final (unscaled under AMP, all-reduced under DDP) and before the optimizer consumes them.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable

import torch

from prunekit.kernels import score_step_

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.pruner import PrunedLayer


class Criterion(ABC):
    """Scores the units of every layer of one pruner."""

    #: True when scores come from gradients (so an event must wait for at least one optimizer step)
    needs_grad: bool = False
    #: True for pattern_lock: masks come from the existing zeros, not from scores
    locks: bool = False
    #: True when scores accumulate only inside [start_step, end_step] (block_mask, as the original)
    window_only: bool = False

    @classmethod
    def pattern_error(cls, pattern: Any) -> str | None:
        """Why this criterion cannot rank units of ``pattern`` (a parsed Pattern); None when it can."""
        return None

    @classmethod
    def module_error(cls, module: torch.nn.Module) -> str | None:
        """Why this criterion leaves ``module`` dense; None when it can prune it."""
        return None

    def __init__(self, low_memory_usage: bool = False) -> None:
        self.score_dtype = torch.bfloat16 if low_memory_usage else torch.float32
        self.scores: dict[str, torch.Tensor] = {}

    @property
    def ready(self) -> bool:
        """Whether scores exist for ranking now."""
        return True

    def accumulate(self, layers: Iterable["PrunedLayer"], mask_grads: bool = False) -> set[int]:
        """Fold the current gradients into the scores (gradient-based criteria only). With ``mask_grads`` a
        criterion may also apply the layers' gradient masks on the way; it returns the ``id`` of every layer
        whose gradient it masked (the caller masks the others)."""
        return set()

    @abstractmethod
    def layer_scores(self, layer: "PrunedLayer") -> torch.Tensor:
        """Scores of ``layer`` at ``layer.bound.score_shape``, float32 (``score_scale`` applied)."""

    @staticmethod
    def scaled(layer: "PrunedLayer", scores: torch.Tensor) -> torch.Tensor:
        """Accumulated float32 scores → the configured reduction (a block mean is stored as a sum)."""
        scale = layer.bound.score_scale
        return scores if scale == 1.0 else scores * scale

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {k: v.clone() for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {k: v.clone() for k, v in state.get("scores", {}).items()}


class GradientCriterion(Criterion):
    """Base of criteria that store per-step gradient information."""

    needs_grad = True
    #: weight of the old score when a new step is folded in (0 = keep only the latest step)
    momentum: float = 0.0
    #: the step term as the fused CPU kernel knows it: True = W·G, False = G, None = no fused form
    fused_term: bool | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass with its own step_term computes something the kernel does not, unless it says otherwise
        if "step_term" in cls.__dict__ and "fused_term" not in cls.__dict__:
            cls.fused_term = None

    @property
    def ready(self) -> bool:
        return bool(self.scores)

    @property
    def horizon(self) -> int:
        """How many steps before an event a gradient still matters: older ones weigh below 1e-6 of the
        newest (momentum criteria), or are overwritten (latest-step criteria), so they are not computed."""
        if self.momentum <= 0.0:
            return 1
        return math.ceil(math.log(1e-6) / math.log(self.momentum))

    def __init__(self, low_memory_usage: bool = False) -> None:
        super().__init__(low_memory_usage)
        self._scratch = torch.empty(0)
        self._views: dict[tuple, torch.Tensor] = {}

    @abstractmethod
    def step_term(self, weight: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Signed element-wise importance of this step, written into ``out``; its absolute value is scored."""

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        # one reusable float32 buffer: a fresh layer-sized allocation every step costs page faults on CPU; the
        # per-shape views of it are kept too (this runs for every layer on every step)
        key = (tuple(like.shape), like.device)
        view = self._views.get(key)
        if view is None:
            if self._scratch.numel() < like.numel() or self._scratch.device != like.device:
                self._scratch = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
                self._views.clear()
            view = self._views[key] = self._scratch[: like.numel()].view(like.shape)
        return view

    def step_scores(self, layer: "PrunedLayer") -> torch.Tensor | None:
        """This step's term of ``layer`` at score granularity (None: no gradient reached it)."""
        return layer.reduced_scores(self.step_term, self._buffer, needs_grad=True)

    def _fused_step(self, layer: "PrunedLayer", mask_grad: bool) -> tuple[bool, bool]:
        """The whole update of one layer (and its gradient mask) in one pass of the CPU kernel. Returns
        (scores updated, gradient masked); (False, False) when the kernel does not apply."""
        tiles = layer.bound.tiles
        if tiles is None or self.fused_term is None or self.score_dtype != torch.float32:
            return False, False
        weight = layer.weight
        grad = weight.grad
        if grad is None:
            return False, False
        keep = None
        if mask_grad:
            mask_grad, keep = layer.fused_keep()
        old = self.scores.get(layer.name)
        fresh = old is None
        if fresh:
            old = torch.empty(layer.score_shape, dtype=torch.float32, device=grad.device)
        momentum = 0.0 if fresh else self.momentum  # momentum 0: the kernel overwrites without reading
        if not score_step_(weight if self.fused_term else None, grad, old, tiles, momentum, keep):
            return False, False
        self.scores[layer.name] = old
        return True, mask_grad

    @torch.no_grad()
    def accumulate(self, layers: Iterable["PrunedLayer"], mask_grads: bool = False) -> set[int]:
        masked: set[int] = set()
        for layer in layers:
            fused, grad_masked = self._fused_step(layer, mask_grads)
            if grad_masked:
                masked.add(id(layer))
            if fused:
                continue
            term = self.step_scores(layer)
            if term is None:  # no gradient reached this layer in this step
                continue
            old = self.scores.get(layer.name)
            if old is None or self.momentum == 0.0:
                self.scores[layer.name] = term.to(self.score_dtype, copy=True)
            elif old.dtype == term.dtype:
                torch.add(term, old, alpha=self.momentum, out=old)  # old = term + momentum·old, one pass
            else:
                old.mul_(self.momentum).add_(term)
        return masked

    def layer_scores(self, layer: "PrunedLayer") -> torch.Tensor:
        score = self.scores.get(layer.name)
        if score is None:  # a layer that never received a gradient: rank it as unimportant
            return torch.zeros(layer.score_shape, device=layer.device)
        return self.scaled(layer, score.float())
