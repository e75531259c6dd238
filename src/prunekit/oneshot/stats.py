"""Running statistics of a linear layer's inputs, accumulated batch by batch over calibration tokens.

Each one-shot method declares which statistics it needs (``hessian`` for SparseGPT, ``sq_norm`` for Wanda,
``mean``/``var`` for DSnoT and FLAP-style scores); the pipeline feeds every input batch of the selected
linears here. Everything is kept in float32 on the layer's device and normalised by the token count, so the
values do not depend on how calibration was batched.
"""
from __future__ import annotations

from typing import Iterable

import torch

STAT_KINDS = ("hessian", "sq_norm", "mean", "var")


class InputStats:
    """Per-input-feature statistics of the tokens a linear has seen.

    * ``hessian``: ``H = (2/n) Σ xᵀx``, shape ``[in, in]`` (SparseGPT's layer-wise Hessian).
    * ``sq_norm``: ``(1/n) Σ x_j²`` per feature (Wanda's ``‖X_j‖²`` up to the constant n).
    * ``mean`` / ``var``: per feature, over tokens (population variance).
    """

    def __init__(self, in_features: int, kinds: Iterable[str], device: torch.device | str | None = None) -> None:
        kinds = tuple(dict.fromkeys(kinds))
        unknown = [k for k in kinds if k not in STAT_KINDS]
        if unknown:
            raise ValueError(f"stat kinds {unknown} unknown; allowed: {', '.join(STAT_KINDS)}")
        self.in_features, self.kinds, self.count = in_features, kinds, 0
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._xtx = torch.zeros(in_features, in_features, device=dev) if "hessian" in kinds else None
        need_moments = any(k in kinds for k in ("sq_norm", "mean", "var"))
        self._sum = torch.zeros(in_features, device=dev) if need_moments else None
        self._sumsq = torch.zeros(in_features, device=dev) if need_moments else None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs, any leading shape, last axis = input features."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"input has {x.shape[1]} features, the layer expects {self.in_features}")
        if self._xtx is not None:
            self._xtx = self._xtx.to(x.device)
            self._xtx.addmm_(x.t(), x)
        if self._sum is not None:
            self._sum = self._sum.to(x.device)
            self._sumsq = self._sumsq.to(x.device)
            self._sum += x.sum(dim=0)
            self._sumsq += (x * x).sum(dim=0)
        self.count += x.shape[0]

    def _need(self, kind: str) -> None:
        if kind not in self.kinds:
            raise KeyError(f"statistic {kind!r} was not collected (collected: {', '.join(self.kinds)})")
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")

    @property
    def hessian(self) -> torch.Tensor:
        self._need("hessian")
        return self._xtx * (2.0 / self.count)

    @property
    def sq_norm(self) -> torch.Tensor:
        self._need("sq_norm")
        return self._sumsq / self.count

    @property
    def mean(self) -> torch.Tensor:
        self._need("mean")
        return self._sum / self.count

    @property
    def var(self) -> torch.Tensor:
        self._need("var")
        mean = self._sum / self.count
        return (self._sumsq / self.count - mean * mean).clamp_min(0.0)
