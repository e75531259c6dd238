"""Restoring what removed channels contributed on average, in the layer that read them.

A removed input feature ``j`` of the next linear ``y = W x + b`` took away ``W[:, j] x_j``. Two corrections:

* ``bias`` (FLAP): add its mean contribution to the bias, ``b' = b + W[:, R] E[x_R]``. Exact on the calibration
  mean: the pruned layer maps ``E[x]_K`` to what the dense one mapped ``E[x]`` to.
* ``lstsq``: refit the kept columns to the dense outputs over the calibration tokens,
  ``W_K' = argmin E||W x + b - W_K' x_K - b'||²`` (with the bias as a free column when the layer has one),
  ``W_K' = W E[x x_Kᵀ] (E[x_K x_Kᵀ] + λI)⁻¹``, ``λ`` = 1 % of the mean diagonal.

Where the bias lives matters for reloading: a layer that has no bias can only get one if the model family has
a config flag that gives *every* such layer one (:data:`BIAS_FLAGS`: Llama's ``mlp_bias`` / ``attention_bias``;
the family's other projections then get zero biases, which change nothing). Families without such a flag
(Qwen2's o_proj and MLP, Mistral) would need a bias plain transformers cannot load, so ``auto`` uses ``lstsq``
there.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.oneshot.stats import InputStats

COMPENSATIONS = ("auto", "bias", "lstsq", "none")
Kind = Literal["ffn", "attention"]

# model_type -> (FFN flag, attention flag): config flags that give every linear of that part a bias
BIAS_FLAGS: dict[str, dict[str, str]] = {
    "llama": {"ffn": "mlp_bias", "attention": "attention_bias"},
}

DAMPING = 0.01


def bias_flag(config: object, kind: Kind) -> str | None:
    """The config flag that gives every ``kind`` linear of this family a bias, if the family has one."""
    return BIAS_FLAGS.get(getattr(config, "model_type", ""), {}).get(kind)


def can_carry_bias(model: nn.Module, consumer: nn.Module, kind: Kind) -> bool:
    """True when a bias on ``consumer`` survives a plain ``from_pretrained`` reload."""
    return getattr(consumer, "bias", None) is not None or bias_flag(getattr(model, "config", None), kind) is not None


def resolve(mode: str, model: nn.Module, consumer: nn.Module, kind: Kind) -> str:
    """The concrete correction for ``mode`` (``auto``: bias where it can be carried, else lstsq)."""
    if mode not in COMPENSATIONS:
        raise ConfigError("compensation", mode, f"allowed: {', '.join(COMPENSATIONS)}")
    if mode == "auto":
        return "bias" if can_carry_bias(model, consumer, kind) else "lstsq"
    if mode == "bias" and not can_carry_bias(model, consumer, kind):
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError("compensation", mode, "allowed here: auto, lstsq, none",
                          f"{family} has no bias on this layer and no config flag that adds one, so a plain "
                          "transformers reload would drop it")
    return mode


def fold_mean(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
              removed: torch.Tensor) -> torch.Tensor:
    """The new bias: ``b + W[:, removed] @ mean[removed]`` (float32, ``[out]``)."""
    base = bias.float() if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    return base + weight[:, removed].float() @ mean[removed].float().to(weight.device)


def least_squares(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, keep: torch.Tensor,
                  damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New kept columns ``[out, |keep|]`` (and new bias when ``bias`` is not None), see the module docstring."""
    w = weight.double().cpu()
    second = stats.hessian.double().cpu() / 2.0      # E[x xᵀ] (InputStats keeps 2/n XᵀX)
    mean = stats.mean.double().cpu()
    h_kk = second[keep][:, keep]
    lam = damping * float(h_kk.diagonal().mean()) if h_kk.numel() else 0.0
    cross = w @ second[:, keep]                       # E[(W x) x_Kᵀ]
    if bias is None:
        a = h_kk + lam * torch.eye(len(keep), dtype=torch.float64)
        new_w = torch.linalg.solve(a, cross.T).T
        return new_w.float(), None
    b = bias.double().cpu()
    n = len(keep)
    a = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    a[:n, :n] = h_kk + lam * torch.eye(n, dtype=torch.float64)
    a[:n, n] = a[n, :n] = mean[keep]
    a[n, n] = 1.0
    c = torch.cat([cross + b[:, None] * mean[keep][None, :], (w @ mean + b)[:, None]], dim=1)
    sol = torch.linalg.solve(a, c.T).T
    return sol[:, :n].float(), sol[:, n].float()
