"""Sparsity reports: per layer and in total, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.layouts import layout_of
from prunekit.masks import mask_buffer_name, pruned_params
from prunekit.patterns.heads import HEAD_MASK

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.pruning import Pruning


@dataclass
class LayerRow:
    """One weight: how sparse it is, elementwise and in pattern units (blocks, groups, channels)."""

    name: str
    shape: list[int]
    pattern: str
    element_sparsity: float
    block_sparsity: float | None
    status: str = "pruned"


@dataclass
class SparsityReport:
    """Per-layer rows plus three totals: over pruned layers, over all Linear/Conv weights, over all params."""

    layers: list[LayerRow] = field(default_factory=list)
    pruned_layers_sparsity: float = 0.0
    linear_conv_sparsity: float = 0.0
    all_params_sparsity: float = 0.0
    pruned_zeros: int = 0
    pruned_numel: int = 0
    linear_conv_zeros: int = 0
    linear_conv_numel: int = 0
    all_zeros: int = 0
    all_numel: int = 0

    @classmethod
    def merge(cls, parts: "list[SparsityReport]") -> "SparsityReport":
        """One report over disjoint parts of a model (e.g. measured block by block while streaming)."""
        rows = [r for p in parts for r in p.layers]
        pz, pn = sum(p.pruned_zeros for p in parts), sum(p.pruned_numel for p in parts)
        lz, ln = sum(p.linear_conv_zeros for p in parts), sum(p.linear_conv_numel for p in parts)
        az, an = sum(p.all_zeros for p in parts), sum(p.all_numel for p in parts)
        return cls(rows, pz / max(1, pn), lz / max(1, ln), az / max(1, an), pz, pn, lz, ln, az, an)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text table for logs and terminals."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':<18} {'pattern':<10} {'elem':>7} {'block':>7}  status",
                 "-" * (width + 60)]
        for r in self.layers:
            block = "-" if r.block_sparsity is None else f"{r.block_sparsity:7.2%}"
            lines.append(f"{r.name:<{width}}  {str(tuple(r.shape)):<18} {r.pattern:<10} "
                         f"{r.element_sparsity:7.2%} {block:>7}  {r.status}")
        lines += ["-" * (width + 60),
                  f"pruned layers:         {self.pruned_layers_sparsity:.4f} "
                  f"({self.pruned_zeros}/{self.pruned_numel} zeros)",
                  f"all Linear/Conv weights: {self.linear_conv_sparsity:.4f}",
                  f"all parameters:        {self.all_params_sparsity:.4f}"]
        return "\n".join(lines)


def _zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


@torch.no_grad()
def sparsity_report(model: nn.Module, pruning: "Pruning | None" = None, prefix: str = "") -> SparsityReport:
    """Measure ``model``'s sparsity. Pruned weights are found from their mask buffers; with ``pruning``,
    layers its patterns had to leave dense are listed too, with the reason. ``prefix`` goes before every layer
    name (a submodule measured on its own). Tensors on the meta device (not materialised) are left out."""
    rows: list[LayerRow] = []
    pruned_zeros = pruned_numel = lc_zeros = lc_numel = 0
    units = {}
    if pruning is not None:
        units = {l.name: l for l in pruning.layers}
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        for param_name, spec in pruned_params(module).items():
            weight = getattr(module, param_name)
            if weight.is_meta:
                continue
            zeros = _zeros(weight)
            layer = units.get(name)
            block = None
            if layer is not None:
                block = layer.bound.pruned_units(layer.mask) / layer.num_units
            elif isinstance(getattr(module, mask_buffer_name(param_name), None), torch.Tensor):
                mask = getattr(module, mask_buffer_name(param_name))
                block = 1.0 - float(mask.float().mean())
            rows.append(LayerRow(name if param_name == "weight" else f"{name}.{param_name}",
                                 list(weight.shape), spec, zeros / weight.numel(), block))
            pruned_zeros += zeros
            pruned_numel += weight.numel()
        if layout_of(module) is not None and not module.weight.is_meta:
            lc_zeros += _zeros(module.weight)
            lc_numel += module.weight.numel()
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        head_mask = module._buffers.get(HEAD_MASK) if hasattr(module, "_buffers") else None
        if head_mask is None:
            continue
        layer = units.get(name)
        element = None
        if layer is not None:
            zeros = sum(_zeros(m.weight) for m in layer.modules)
            element = zeros / layer.numel
            pruned_zeros += zeros
            pruned_numel += layer.numel
        rows.append(LayerRow(name, [int(head_mask.numel())], "mha", element if element is not None else 0.0,
                             1.0 - float(head_mask.float().mean()),
                             "heads pruned" if layer is not None else "heads (weights not measured)"))
    if pruning is not None:
        for pruner in pruning.pruners:
            for name, reason in pruner.skipped:
                weight = model.get_submodule(name).weight
                rows.append(LayerRow(name, list(weight.shape), pruner.pattern.spec,
                                     _zeros(weight) / weight.numel(), None, reason))
    params = [p for p in model.parameters() if not p.is_meta]
    all_zeros = sum(_zeros(p) for p in params)
    all_numel = sum(p.numel() for p in params)
    return SparsityReport(rows, pruned_zeros / max(1, pruned_numel), lc_zeros / max(1, lc_numel),
                          all_zeros / max(1, all_numel), pruned_zeros, pruned_numel, lc_zeros, lc_numel,
                          all_zeros, all_numel)
