"""The one-shot method interface: a short function over one linear's weight and its input statistics.

A method never sees the model: the pipeline (prunekit.oneshot.pipeline) hands it a float32 ``[out, in]`` weight
(HF ``Conv1D`` weights arrive transposed), the :class:`~prunekit.oneshot.stats.InputStats` it asked for, the
layer's target sparsity and the pattern, and gets back the new weight (reconstruction methods such as SparseGPT
update the kept weights) and the keep-mask. Writing them into the model and registering prunekit masks is the
caller's job.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.errors import ConfigError
from prunekit.oneshot.stats import InputStats
from prunekit.patterns.base import Pattern
from prunekit.patterns.blocks import BlockPattern
from prunekit.patterns.nm import NMPattern
from prunekit.registry import Registry


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods (each reads the ones it uses)."""

    block_size: int = 128        # SparseGPT: columns per lazy-update block
    dampening: float = 0.01      # SparseGPT: fraction of mean(diag H) added to the diagonal
    dsnot: bool = False          # refine the mask with DSnoT (training-free prune-and-grow)
    dsnot_cycles: int = 100      # DSnoT: at most this many swaps per row
    # DSnoT: a row stops once |expected output shift| is below this; per-token units (the original's 0.1 summed
    # over a sample's 2048 tokens, about 5e-5 per token)
    dsnot_threshold: float = 5e-5
    dsnot_var_power: float = 1.0  # DSnoT: growth score divides by Var[x]^power
    use_variant: bool = False    # Wanda's per-row cumulative-sum threshold variant
    seed: int = 0
    # prune a block's linears group by group, each calibrated with the earlier groups pruned (None: the
    # method's own default, OneShotMethod.true_sequential)
    true_sequential: bool | None = None


def pattern_kind(pattern: Pattern) -> str:
    """``"1x1"``, ``"N:M"`` or the pattern's spec (for error messages and capability checks)."""
    if isinstance(pattern, NMPattern):
        return "N:M"
    if isinstance(pattern, BlockPattern) and pattern.rows == 1 and pattern.cols == 1:
        return "1x1"
    return pattern.spec


class OneShotMethod(ABC):
    """One one-shot pruning algorithm. Subclasses set ``name``, ``patterns`` and implement :meth:`prune`."""

    name: ClassVar[str]
    #: pattern kinds this method can produce (see :func:`pattern_kind`)
    patterns: ClassVar[tuple[str, ...]] = ("1x1", "N:M")
    #: True for methods that need the whole model's gradients instead of one layer's inputs (retrain_free):
    #: the caller runs them through their own entry point, never :meth:`prune` inside the layer pipeline
    whole_model: ClassVar[bool] = False
    #: default of ``true_sequential``: True for methods that rebuild the kept weights from their inputs
    #: (SparseGPT), whose reconstruction is only as good as the inputs it calibrates on
    true_sequential: ClassVar[bool] = False

    def stat_kinds(self, options: MethodOptions) -> tuple[str, ...]:
        """Which :class:`InputStats` kinds the method needs (given its options)."""
        return ()

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ConfigError(key="pattern") if this method cannot produce ``pattern``."""
        if pattern_kind(pattern) not in self.patterns:
            raise ConfigError("pattern", pattern.spec,
                              f"allowed for method {self.name!r}: {', '.join(self.patterns)} (N:M as e.g. 2:4)")

    def check_options(self, options: MethodOptions) -> None:
        """Raise ConfigError naming the option if this method cannot run with ``options`` (before any work)."""
        if options.dsnot_cycles < 0:
            raise ConfigError("dsnot_cycles", options.dsnot_cycles, "allowed: an integer >= 0")
        if not options.dsnot_threshold >= 0:
            raise ConfigError("dsnot_threshold", options.dsnot_threshold, "allowed: a number >= 0")

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(new_weight, keep_mask)`` for a float32 ``[out, in]`` weight.

        Unstructured (``1x1``): exactly ``round(sparsity * numel)`` zeros, chosen per output row or per layer as
        the method prescribes. N:M: exactly N zeros in every M consecutive inputs of each row (``sparsity`` is
        then N/M and ignored).
        """


METHODS: Registry[OneShotMethod] = Registry("method")


def register_method(cls: type[OneShotMethod]) -> type[OneShotMethod]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (methods hold no state)."""
    METHODS.register(cls.name)(cls())
    return cls
