"""Where the output and input axes of a module's weight are.

Patterns cut weights along *output* rows and *input* columns. Module types store those axes differently
(``nn.Linear`` is ``[out, in]``, transformers' ``Conv1D`` is ``[in, out]``, ``ConvTranspose`` is
``[in, out, *k]``), so every prunable type declares its layout here instead of patterns guessing from shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightLayout:
    """Axis indices of a weight tensor; every other axis is a spatial tap (kernel position)."""

    out_axis: int
    in_axis: int


_LINEAR = WeightLayout(out_axis=0, in_axis=1)
_TRANSPOSED = WeightLayout(out_axis=1, in_axis=0)


def _conv_layout(module: nn.Module) -> WeightLayout:
    return _TRANSPOSED if getattr(module, "transposed", False) else _LINEAR


# Keyed by class name along the MRO so optional dependencies (transformers) need not be imported.
_LAYOUTS = {
    "Linear": lambda m: _LINEAR,
    "_ConvNd": _conv_layout,
    "Conv1D": lambda m: _TRANSPOSED,  # transformers.pytorch_utils.Conv1D (GPT-2) stores [in, out]
}


def layout_of(module: nn.Module, param_name: str = "weight") -> WeightLayout | None:
    """The layout of ``module.<param_name>``, or None if prunekit does not know how to cut this module type."""
    weight = getattr(module, param_name, None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    for cls in type(module).__mro__:
        factory = _LAYOUTS.get(cls.__name__)
        if factory is not None:
            return factory(module)
    return None


def register_layout(class_name: str, out_axis: int, in_axis: int) -> None:
    """Teach prunekit the weight layout of a custom module type (matched by class name along the MRO)."""
    layout = WeightLayout(out_axis=out_axis, in_axis=in_axis)
    _LAYOUTS[class_name] = lambda m: layout
