"""What a one-shot run does to each decoder block: select its linears, prune them, keep prunekit masks.

Used by :func:`prunekit.oneshot.api.oneshot` (in memory or streaming) and by the original's call shapes in
:mod:`prunekit.compat`. Every linear of block *i* sees the outputs of the already pruned blocks < *i*; inside the
block, by default, also the outputs of its already pruned linears (``true_sequential``, see :func:`prune_block`).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from prunekit.errors import ConfigError, SelectionError
from prunekit.layouts import layout_of
from prunekit.masks import PrunedLayer
from prunekit.oneshot.methods.base import MethodOptions, OneShotMethod, pattern_kind
from prunekit.oneshot.pipeline import LayerContext
from prunekit.oneshot.structure import DecoderStructure, block_linears, is_linear
from prunekit.patterns.base import Pattern
from prunekit.selection import names_head


@dataclass
class Selection:
    """The linears a run prunes, block by block (name relative to the block -> qualified name)."""

    per_block: list[dict[str, str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.per_block)

    def modules(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """Block ``index``'s selected linears (by relative name) out of the materialised ``block``."""
        return {rel: block.get_submodule(rel) for rel in self.per_block[index]}


def select_linears(model: nn.Module, structure: DecoderStructure, op_names: tuple[str, ...],
                   excluded_op_names: tuple[str, ...], pattern: Pattern) -> Selection:
    """Every Linear/Conv1D inside the decoder blocks matching ``op_names`` (all when empty) and no exclusion.

    Works on a meta-device skeleton too (only names and shapes are read). Linears the pattern cannot tile are
    left dense with a warning, as the training-aware engine does. Modules outside the blocks (lm_head,
    embeddings) are never selected; naming one explicitly is an error, since one-shot methods calibrate block
    by block.
    """
    include = [re.compile(p) for p in op_names] or [re.compile("")]
    exclude = [re.compile(p) for p in excluded_op_names]
    per_block: list[dict[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for index, block in enumerate(structure.layers):
        chosen: dict[str, str] = {}
        for rel, module in block_linears(block).items():
            qualified = f"{structure.layer_name(index)}.{rel}"
            if not any(r.search(qualified) for r in include) or any(r.search(qualified) for r in exclude):
                continue
            bound = pattern.bind(module.weight.shape, layout_of(module))
            if isinstance(bound, str):
                skipped.append((qualified, f"left dense: {bound}"))
                continue
            chosen[rel] = qualified
        per_block.append(chosen)
    prefix = structure.path + "." if structure.path else ""
    for name, module in model.named_modules():
        if name and not name.startswith(prefix) and is_linear(module) and op_names and names_head(op_names, name):
            raise ConfigError("op_names", name, "allowed: layers inside the decoder blocks (one-shot methods "
                              "calibrate block by block; lm_head and embeddings stay dense)")
    if skipped:
        warnings.warn(f"prunekit: {len(skipped)} linears left dense under pattern {pattern.spec}: "
                      f"{skipped[0][0]}: {skipped[0][1]}" + (" ..." if len(skipped) > 1 else ""), stacklevel=3)
    selection = Selection(per_block, skipped)
    if selection.count == 0:
        example = ", ".join(f"{structure.layer_name(0)}.{n}" for n in list(block_linears(structure.layers[0]))[:4])
        raise SelectionError(f"op_names={list(op_names)!r}, excluded_op_names={list(excluded_op_names)!r} select "
                             f"no linear inside the decoder blocks (e.g. {example})")
    return selection


def _as_out_in(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight as ``[out, in]`` (HF Conv1D stores ``[in, out]``)."""
    w = weight.detach()
    if layout_of(module).out_axis == 1:
        w = w.t()
    return w.to(torch.float32, copy=True).contiguous()


def check_exact(keep: torch.Tensor, sparsity: float, pattern: Pattern, name: str, method: str) -> None:
    """The guarantee every run gives: exactly ``round(s·numel)`` pruned (1x1), exactly N of every M (N:M)."""
    if pattern_kind(pattern) == "N:M":
        kept = keep.reshape(keep.shape[0], -1, pattern.m).sum(dim=-1)
        ok = bool((kept == pattern.m - pattern.n).all())
        expected = f"{pattern.n} pruned in every {pattern.m}"
    elif pattern_kind(pattern) == "1x1":
        ok = keep.numel() - int(keep.count_nonzero()) == int(round(sparsity * keep.numel()))
        expected = f"{int(round(sparsity * keep.numel()))} pruned"
    else:
        return  # channel patterns (retrain_free): the method owns its count
    if not ok:
        raise RuntimeError(f"method {method!r} returned a mask for {name} that breaks its contract "
                           f"(expected {expected}); this is a bug in the method")


@torch.no_grad()
def prune_linear(name: str, module: nn.Module, stats: Any, sparsity: float, pattern: Pattern,
                 method: OneShotMethod, options: MethodOptions) -> PrunedLayer:
    """Prune one linear in place (weight written back in its own dtype) and register its prunekit mask."""
    weight = module.weight
    new, keep = method.prune(_as_out_in(weight, module), stats, sparsity, pattern, options)
    keep = keep.to(torch.bool)
    check_exact(keep, sparsity, pattern, name, method.name)
    new = new.to(weight.device) * keep.to(weight.device)  # pruned weights exactly zero, whatever the method did
    if layout_of(module).out_axis == 1:
        new, keep = new.t(), keep.t()
    weight.data.copy_(new)
    bound = pattern.bind(weight.shape, layout_of(module))
    layer = PrunedLayer(name, module, bound, pattern.spec)
    layer.set_mask(keep.contiguous().to(weight.device))
    return layer


def prune_block(ctx: LayerContext, linears: Mapping[str, nn.Module], qualified: Mapping[str, str],
                sparsity: float, pattern: Pattern, method: OneShotMethod, options: MethodOptions,
                after_linear: Callable[[], None] | None = None, true_sequential: bool | None = None,
                group_cache: dict | None = None) -> list[PrunedLayer]:
    """Prune one block's selected linears (``after_linear`` runs after each, e.g. to hand the heap's freed
    temporaries back while streaming).

    ``true_sequential``: the linears are pruned in groups that read the same tensor, in forward order (q/k/v,
    then o, then gate/up, then down), each group's statistics collected with the earlier groups already pruned,
    so a later linear calibrates on the inputs it will really see. Otherwise one statistics pass over the dense
    block serves every linear (llm-compressor's way). None: ``options.true_sequential``, else the method's default.
    ``group_cache``: a dict kept across the blocks of one run, so blocks of one class and selection are probed for
    their input groups once.
    """
    if true_sequential is None:
        true_sequential = method.true_sequential if options.true_sequential is None else options.true_sequential
    kinds = method.stat_kinds(options)
    # linears reading the same tensor share one set of statistics (q/k/v one Hessian, gate/up another)
    if not kinds:
        groups = [list(linears)]
    elif group_cache is None:
        groups = ctx.input_groups(linears)
    else:
        key = (type(ctx.block), tuple(linears))
        if key not in group_cache:
            group_cache[key] = ctx.input_groups(linears)
        groups = group_cache[key]
    stages = groups if true_sequential else [list(linears)]
    layers = []
    for stage in stages:
        members = {rel: linears[rel] for rel in stage}
        stats = ctx.collect(members, kinds, stop_early=true_sequential, shared=groups) if kinds else {}
        for rel, module in members.items():
            layers.append(prune_linear(qualified[rel], module, stats.pop(rel, None), sparsity, pattern, method,
                                       options))
            if after_linear is not None:
                after_linear()
    return layers
