"""Sparsity profiles: how a model-wide target sparsity is spread over the decoder blocks.

A profile is made per run from the registry, ``PROFILES.get(name)(**params)``, and used in two steps:

1. if ``profile.needs_calibration_pass``, the caller runs one extra *dense* sequential pass
   (:func:`prunekit.oneshot.pipeline.run_sequential`) and, for every block, calls
   ``profile.observe(ctx, linears)`` with the block's selected linears (name -> module);
2. ``profile.sparsities(target, n_layers)`` gives one sparsity per block, in block order.

:meth:`SparsityProfile.layer_sparsities` bundles both for a caller that hands in a ``run_pass`` callable.

``uniform`` puts every block at the target. ``owl`` (Yin et al. 2024, "Outlier Weighed Layerwise sparsity")
prunes blocks with more activation outliers less: per block, the outlier ratio is the percentage of Wanda scores
``|W_ij|·‖X_j‖`` over all the block's selected linears that exceed ``m`` times their mean; the ratios are scaled
to ``[0, 2·lmbda]``, shifted so their plain mean over blocks is ``1 - target`` (OWL's formula; decoder blocks are
identical, so the plain mean is also the parameter-weighted one) and the block's sparsity is one minus that.
OWL's formula alone can leave ``[target - lmbda, target + lmbda]`` when the ratios are skewed; we then clip to
that band and re-shift (bisection) so the mean stays exactly the target.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.layouts import layout_of
from prunekit.patterns.base import Pattern
from prunekit.patterns.nm import NMPattern
from prunekit.registry import Registry

#: ``observe(ctx, linears)``: called once per decoder block during the dense calibration pass
Observer = Callable[["LayerContext", Mapping[str, nn.Module]], None]  # noqa: F821  (pipeline.LayerContext)
#: ``run_pass(observer)``: the caller's dense sequential pass, calling ``observer`` for every block
RunPass = Callable[[Observer], None]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 ``[out, in]`` view or copy (HF ``Conv1D`` stores ``[in, out]``)."""
    layout = layout_of(module)
    w = module.weight.detach()
    if layout is not None and layout.out_axis == 1:
        w = w.t()
    return w.float()


class SparsityProfile(ABC):
    """One way to spread the target over blocks. Instances hold the state of one run."""

    name: ClassVar[str]
    #: True if :meth:`sparsities` needs :meth:`observe` to have seen every block in a dense pass
    needs_calibration_pass: ClassVar[bool] = False
    #: the InputStats kinds :meth:`observe` collects (informative; observe collects them itself)
    stat_kinds: ClassVar[tuple[str, ...]] = ()

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ConfigError(key="profile") if this profile cannot vary the sparsity of ``pattern``."""

    def observe(self, ctx, linears: Mapping[str, nn.Module]) -> None:
        """Record what this profile needs from one dense block (``ctx`` is a pipeline ``LayerContext``)."""

    @abstractmethod
    def sparsities(self, target: float, n_layers: int) -> list[float]:
        """One sparsity per decoder block for a model-wide ``target``."""

    def layer_sparsities(self, run_pass: RunPass | None, target: float, n_layers: int) -> list[float]:
        """Run the dense pass through ``run_pass(self.observe)`` if needed, then return :meth:`sparsities`."""
        if self.needs_calibration_pass:
            if run_pass is None:
                raise ValueError(f"profile {self.name!r} needs a dense calibration pass; run_pass is None")
            run_pass(self.observe)
        return self.sparsities(target, n_layers)


PROFILES: Registry[type[SparsityProfile]] = Registry("profile")


def register_profile(cls: type[SparsityProfile]) -> type[SparsityProfile]:
    """Class decorator: register ``cls`` under ``cls.name`` (instantiate per run with its parameters)."""
    PROFILES.register(cls.name)(cls)
    return cls


def make_profile(name: str, **params: float) -> SparsityProfile:
    """``PROFILES.get(name)(**params)`` with unknown parameters reported as a ConfigError."""
    cls = PROFILES.get(name)
    try:
        return cls(**params)
    except TypeError:
        import inspect

        allowed = [p for p in inspect.signature(cls).parameters]
        raise ConfigError("profile", {name: params},
                          f"allowed parameters for {name!r}: {', '.join(allowed) or 'none'}") from None


@register_profile
class Uniform(SparsityProfile):
    """Every block at the target."""

    name = "uniform"

    def sparsities(self, target: float, n_layers: int) -> list[float]:
        return [float(target)] * n_layers


@register_profile
class OWL(SparsityProfile):
    """Outlier Weighed Layerwise sparsity: blocks with more Wanda-score outliers are pruned less.

    ``m``: a score is an outlier above ``m`` times the block's mean score (OWL's ``Hyper_m``, default 5);
    ``lmbda``: the largest deviation of a block's sparsity from the target (OWL's ``Lamda``, default 0.08).
    """

    name = "owl"
    needs_calibration_pass = True
    stat_kinds = ("sq_norm",)

    def __init__(self, m: float = 5.0, lmbda: float = 0.08) -> None:
        if not (isinstance(m, (int, float)) and m > 0):
            raise ConfigError("owl.m", m, "allowed: a number > 0 (outlier threshold in multiples of the mean)")
        if not (isinstance(lmbda, (int, float)) and 0 <= lmbda < 0.5):
            raise ConfigError("owl.lmbda", lmbda, "allowed: a number in [0, 0.5) (max deviation from target)")
        self.m, self.lmbda = float(m), float(lmbda)
        self.outlier_ratios: dict[int, float] = {}

    def check_pattern(self, pattern: Pattern) -> None:
        # N:M fixes every layer's sparsity at N/M: there is nothing left to distribute
        if isinstance(pattern, NMPattern):
            raise ConfigError("profile", self.name, f"allowed with pattern {pattern.spec!r}: uniform "
                              "(N:M fixes each layer's sparsity; use owl with 1x1)")

    def observe(self, ctx, linears: Mapping[str, nn.Module]) -> None:
        if not linears:
            return
        stats = ctx.collect(linears, self.stat_kinds)
        norms = {name: stats[name].sq_norm.sqrt() for name in linears}
        # two sweeps instead of concatenating the block's scores: mean first, then the count above m·mean
        total, count = 0.0, 0
        for name, module in linears.items():
            score = linear_weight(module).abs() * norms[name].to(module.weight.device)
            total += float(score.sum(dtype=torch.float64))
            count += score.numel()
        threshold = self.m * total / count
        above = 0
        for name, module in linears.items():
            score = linear_weight(module).abs() * norms[name].to(module.weight.device)
            above += int((score > threshold).sum())
        self.outlier_ratios[ctx.index] = 100.0 * above / count

    def sparsities(self, target: float, n_layers: int) -> list[float]:
        missing = [i for i in range(n_layers) if i not in self.outlier_ratios]
        if missing:
            raise ValueError(f"profile 'owl': blocks {missing} were not observed in the calibration pass")
        ratios = torch.tensor([self.outlier_ratios[i] for i in range(n_layers)], dtype=torch.float64)
        return owl_sparsities(ratios, target, self.lmbda)


def owl_sparsities(outlier_ratios: torch.Tensor, target: float, lmbda: float) -> list[float]:
    """OWL's block sparsities from per-block outlier ratios; plain mean = ``target``, each within ±``lmbda``.

    Also never below 0 or at/above 1 (the band is intersected with [0, 1)).
    """
    r = outlier_ratios.to(torch.float64)
    span = float(r.max() - r.min()) if r.numel() else 0.0
    if r.numel() == 0 or span == 0.0 or lmbda == 0.0:
        return [float(target)] * r.numel()
    scaled = (r - r.min()) / span * (2.0 * lmbda)
    raw = target + scaled.mean() - scaled          # = 1 - (scaled - mean + (1 - target)), OWL's formula
    lo, hi = max(target - lmbda, 0.0), min(target + lmbda, 1.0 - 1e-6)
    if lo > target or hi < target:
        raise ConfigError("target_sparsity", target, "allowed: a value in [0, 1)")
    if float(raw.min()) < lo or float(raw.max()) > hi:
        raw = _shift_clip_to_mean(raw, lo, hi, target)
    return [float(s) for s in raw]


def _shift_clip_to_mean(raw: torch.Tensor, lo: float, hi: float, target: float) -> torch.Tensor:
    """``clip(raw + c, lo, hi)`` with ``c`` found by bisection so the mean is ``target`` (monotone in ``c``)."""
    a, b = lo - float(raw.max()), hi - float(raw.min())   # at a every value is lo, at b every value is hi
    for _ in range(200):
        c = 0.5 * (a + b)
        if float((raw + c).clamp(lo, hi).mean()) < target:
            a = c
        else:
            b = c
    out = (raw + 0.5 * (a + b)).clamp(lo, hi)
    err = float(out.mean()) - target
    if abs(err) > 1e-9:  # pragma: no cover - bisection on 200 halvings converges far below this
        warnings.warn(f"owl: block sparsities average {float(out.mean()):.6f}, target {target}")
    return out
