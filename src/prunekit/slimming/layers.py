"""One small cutting function per layer type (as in Torch-Pruning's ``pruner/function.py``).

A *layer* here is a module that maps ``in`` features to ``out`` features with a 2-D weight. Every supported type
registers a :class:`LayerOps` that knows where its axes are, how to keep a subset of output rows or input columns,
and which size attributes to update. Types are matched by class name along the MRO so that optional
dependencies (transformers' ``Conv1D``) never need importing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.layouts import layout_of
# masks are buffers named ``<param>_prune_mask`` (the mha pattern's ``head_prune_mask`` ends the same way); a module
# being cut must not carry one
from prunekit.masks import MASK_SUFFIX


@dataclass(frozen=True)
class LayerOps:
    """How to read and cut one layer type.

    ``out_dim`` / ``in_dim`` are the weight dimensions of the output and input features;
    ``out_attr`` / ``in_attr`` the module attributes that record the feature counts.
    """

    kind: str
    out_dim: int
    in_dim: int
    out_attr: str
    in_attr: str

    def out_features(self, module: nn.Module) -> int:
        return int(module.weight.shape[self.out_dim])

    def in_features(self, module: nn.Module) -> int:
        return int(module.weight.shape[self.in_dim])

    def weight_2d(self, module: nn.Module) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view, no copy)."""
        w = module.weight
        return w if self.out_dim == 0 else w.transpose(0, 1)

    def keep_out(self, module: nn.Module, keep: torch.Tensor) -> None:
        """Keep only output features ``keep`` (weight rows and bias entries)."""
        _select_param(module, "weight", self.out_dim, keep)
        if getattr(module, "bias", None) is not None:
            _select_param(module, "bias", 0, keep)
        setattr(module, self.out_attr, int(keep.numel()))

    def keep_in(self, module: nn.Module, keep: torch.Tensor) -> None:
        """Keep only input features ``keep`` (weight columns; the bias is per output and stays)."""
        _select_param(module, "weight", self.in_dim, keep)
        setattr(module, self.in_attr, int(keep.numel()))


def _select_param(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(module, name)
    new = old.detach().index_select(dim, keep.to(old.device)).clone()
    # A fresh Parameter: optimizer state that referenced the old one is stale after slimming (documented).
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


_LAYERS: dict[str, LayerOps] = {
    "Linear": LayerOps("linear", out_dim=0, in_dim=1, out_attr="out_features", in_attr="in_features"),
    # transformers.pytorch_utils.Conv1D (GPT-2): weight stored [in, out], sizes in nf (out) / nx (in).
    "Conv1D": LayerOps("hf_conv1d", out_dim=1, in_dim=0, out_attr="nf", in_attr="nx"),
}


def register_layer(class_name: str, ops: LayerOps) -> None:
    """Teach slimming a custom layer type (matched by class name along the MRO)."""
    _LAYERS[class_name] = ops


def layer_ops(module: nn.Module) -> LayerOps | None:
    """The :class:`LayerOps` of ``module``, or None when slimming cannot cut this type."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    for cls in type(module).__mro__:
        ops = _LAYERS.get(cls.__name__)
        if ops is not None:
            layout = layout_of(module)  # one source of truth for where the out/in axes are
            if layout is not None and (layout.out_axis, layout.in_axis) != (ops.out_dim, ops.in_dim):
                raise ValueError(f"{type(module).__name__}: slimming and pruning disagree on its weight axes")
            return ops
    return None


def is_layer(module: nn.Module) -> bool:
    return layer_ops(module) is not None


def attached_masks(module: nn.Module) -> list[str]:
    """Names of prunekit mask buffers still attached to ``module``."""
    return [name for name, _ in module.named_buffers(recurse=False) if name.endswith(MASK_SUFFIX)]

