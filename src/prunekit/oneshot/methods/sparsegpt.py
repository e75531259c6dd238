"""SparseGPT (Frantar & Alistarh 2023): prune with the layer Hessian and update the kept weights (OBS).

Columns are visited left to right in blocks of ``block_size``. Inside a block each pruned weight's error
``(w - 0) / Hinv_jj`` is spread over the block's later columns through the row of ``Hinv`` (the upper Cholesky
factor of ``H⁻¹``); the block's accumulated errors then update every later column at once (lazy batch update).
Saliency is ``w² / Hinv_jj²``. 1x1 picks per block of columns, but the block counts are apportioned so the layer
holds exactly ``round(sparsity · numel)`` zeros (the original took a per-block quantile, ties pruning more);
N:M picks the N lowest of every M columns per row, with the weights as updated so far.
"""
from __future__ import annotations

import warnings

import torch

from prunekit.errors import ConfigError
from prunekit.oneshot.methods.base import MethodOptions, OneShotMethod, pattern_kind, register_method
from prunekit.oneshot.stats import InputStats
from prunekit.patterns.base import Pattern

_MAX_DAMPING_RETRIES = 12  # up to 1e4 x mean(diag H): H + λI is then positive definite
_warned_damping = False


def _warn_once(message: str) -> None:
    global _warned_damping
    if not _warned_damping:
        _warned_damping = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = dampening · mean(diag H)``, float32.

    When a factorisation fails (H nearly singular in float32), it is retried in float64, then with ten times
    the dampening, and so on; the first such increase warns once per process.
    """
    if not torch.isfinite(hessian).all():
        raise ValueError("sparsegpt: the input Hessian holds NaN or inf (the layer's calibration inputs are not "
                         "finite); check the model in this dtype on the calibration data")
    diag_mean = float(hessian.diagonal().abs().mean())
    scale = diag_mean if diag_mean > 0 else 1.0
    damp = float(dampening)
    for attempt in range(_MAX_DAMPING_RETRIES):
        for dtype in (torch.float32, torch.float64):
            h = hessian.to(dtype).clone()
            h.diagonal().add_(damp * scale)
            factor = _upper_inverse_factor(h)
            if factor is not None:
                if attempt:
                    _warn_once(f"sparsegpt: the Hessian was not positive definite with dampening {dampening}; "
                               f"used {damp:g} for at least one layer (more calibration tokens help)")
                return factor.to(torch.float32)
        damp = max(damp * 10.0, 1e-6)
    raise RuntimeError(f"sparsegpt: no Cholesky factor even with dampening {damp:g}")  # pragma: no cover


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    inv = torch.cholesky_inverse(low)
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def _block_prune_counts(total: int, columns: int, block: int) -> list[int]:
    """How many weights each column block prunes so the blocks add up to ``total`` (proportional, rounded)."""
    counts, done = [], 0
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        upto = int(round(total * stop / columns))
        counts.append(upto - done)
        done = upto
    return counts


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
                    block_size: int = 128, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[out, in]`` weight with its ``[in, in]`` Hessian: ``(new_weight, keep_mask)``."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"sparsegpt: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    nm = pattern_kind(pattern) == "N:M"
    n, m = (pattern.n, pattern.m) if nm else (0, 1)
    if nm and cols % m:
        raise ConfigError("pattern", pattern.spec, f"allowed: M dividing the layer's {cols} inputs")
    # N:M groups must not straddle a block: make the block a multiple of M
    block_size = max(m, (int(block_size) // m) * m)

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0     # an input that never fired carries no information; its weights go
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, dampening)
    del h

    pruned = torch.zeros_like(w, dtype=torch.bool)
    counts = None if nm else _block_prune_counts(int(round(sparsity * w.numel())), cols, block_size)
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        err1 = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if not nm and counts[b]:
            saliency = (w1 * w1) / (d1 * d1).unsqueeze(0)
            mask1.view(-1)[saliency.reshape(-1).topk(counts[b], largest=False).indices] = True
        for i in range(i2 - i1):
            if nm and i % m == 0:
                sal = w1[:, i:i + m] ** 2 / (d1[i:i + m] ** 2).unsqueeze(0)
                mask1.scatter_(1, i + sal.topk(n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / d1[i]
            # OBS: the remaining columns of the block absorb this column's error
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        if i2 < cols:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    w[pruned] = 0.0
    return w, ~pruned


@register_method
class SparseGPT(OneShotMethod):
    """SparseGPT: Hessian-based mask with OBS weight reconstruction (needs the ``hessian`` statistic)."""

    name = "sparsegpt"
    true_sequential = True

    def stat_kinds(self, options: MethodOptions) -> tuple[str, ...]:
        return ("hessian",)

    def check_options(self, options: MethodOptions) -> None:
        super().check_options(options)
        if options.dsnot:
            raise ConfigError("dsnot", True, "allowed with method 'sparsegpt': False (DSnoT refines masks of "
                              "unmodified weights: use it with wanda or magnitude)")
        if options.block_size < 1:
            raise ConfigError("block_size", options.block_size, "allowed: an integer >= 1")
        if not options.dampening >= 0:
            raise ConfigError("dampening", options.dampening, "allowed: a number >= 0")

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_options(options)
        if stats is None:
            raise ValueError("sparsegpt needs the layer's input statistics ('hessian')")
        return sparsegpt_prune(weight, stats.hessian, sparsity, pattern, options.block_size, options.dampening)
