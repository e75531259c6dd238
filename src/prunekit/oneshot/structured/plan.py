"""Deciding every structured cut before the model is touched: widths, kept units, dropped layers.

Widths are uniform across layers by default (so plain ``from_pretrained`` reloads the result) and rounded to a
multiple of ``round_to``: the FFN keeps ``round((1 - ffn_sparsity) * width / round_to) * round_to`` channels,
each layer its highest-scoring ones. ``non_uniform`` ranks FFN channels of all layers together on per-layer
standardised scores (FLAP's global allocation) for the same total, then rounds each layer's width. Heads keep
one legal grouped-query shape for every layer (:mod:`.heads`). ``target_params`` (fraction of decoder
parameters kept) fixes heads and dropped layers as requested and solves for the widest FFN that fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.oneshot.structured.heads import HeadShape, choose_shape, keep_for_shape, shapes_for
from prunekit.oneshot.structured.importance import SCORES, LayerGroups, LayerStats, standardized
from prunekit.slimming.layers import layer_ops


@dataclass(frozen=True)
class Request:
    """What to remove (already range-checked by the options)."""

    ffn_sparsity: float | None = None
    head_sparsity: float = 0.0
    drop_layers: int = 0
    target_params: float | None = None
    round_to: int = 32
    non_uniform: bool = False
    head_cut: str = "auto"
    method: str = "flap"


@dataclass(frozen=True)
class ModelShape:
    """The counts the request is checked against (from the config, or from the detected groups)."""

    layers: int
    width: int
    heads: int
    kv_heads: int


@dataclass
class LayerCosts:
    """Parameters of one decoder layer and what each unit owns."""

    total: int
    per_channel: int
    per_head: int
    per_kv_head: int
    width: int
    heads: int
    kv_heads: int

    def params(self, width: int, heads: int, kv_heads: int) -> int:
        return (self.total - (self.width - width) * self.per_channel - (self.heads - heads) * self.per_head
                - (self.kv_heads - kv_heads) * self.per_kv_head)


@dataclass
class LayerCut:
    """Kept units of one layer (original layer index); None = untouched."""

    index: int
    ffn_keep: torch.Tensor | None = None
    heads_keep: list[int] | None = None
    kv_keep: list[int] | None = None


@dataclass
class StructuredPlan:
    method: str
    drop: list[int]
    cuts: dict[int, LayerCut]
    ffn_widths: dict[int, int]
    head_shape: HeadShape | None
    influence: list[float] = field(default_factory=list)

    @property
    def kept_layers(self) -> list[int]:
        return sorted(self.cuts)


def _features(module: nn.Module) -> tuple[int, int, int]:
    ops = layer_ops(module)
    return ops.in_features(module), ops.out_features(module), int(getattr(module, "bias", None) is not None)


def layer_costs(model: nn.Module, groups: LayerGroups, block: nn.Module) -> LayerCosts:
    """Parameter counts of ``block`` and the share of one FFN channel, query head and key/value head."""
    total = sum(p.numel() for p in block.parameters())
    per_channel = per_head = per_kv = width = heads = kv = 0
    if groups.ffn is not None:
        width = groups.ffn.width
        for name in groups.ffn.producers:
            fin, _, bias = _features(model.get_submodule(name))
            per_channel += fin + bias
        per_channel += _features(model.get_submodule(groups.ffn.consumer))[1]
    a = groups.attention
    if a is not None:
        heads, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
        q_in, _, q_bias = _features(model.get_submodule(a.q))
        per_head = d * (q_in + q_bias) + d * _features(model.get_submodule(a.o))[1]
        k_in, _, k_bias = _features(model.get_submodule(a.k))
        v_in, _, v_bias = _features(model.get_submodule(a.v))
        per_kv = d * (k_in + k_bias + v_in + v_bias)
    return LayerCosts(total, per_channel, per_head, per_kv, width, heads, kv)


def round_width(width: int, sparsity: float, round_to: int) -> int:
    """Channels kept: ``(1 - sparsity) * width`` to the nearest multiple of ``round_to``, at most ``width``."""
    if sparsity <= 0:
        return width
    kept = math.floor((1.0 - sparsity) * width / round_to + 0.5) * round_to
    return min(kept, width)


def check_request(shape: ModelShape, request: Request) -> None:
    """Every check that needs only the model's counts; ConfigError (one line) on the first bad value."""
    if request.drop_layers >= shape.layers:
        raise ConfigError("drop_layers", request.drop_layers,
                          f"allowed: 0 ... {shape.layers - 1} (the model has {shape.layers} decoder layers)")
    if request.ffn_sparsity is not None and request.ffn_sparsity > 0:
        kept = round_width(shape.width, request.ffn_sparsity, request.round_to)
        if kept < 1:
            largest = 1 - (request.round_to / 2) / shape.width
            raise ConfigError("ffn_sparsity", request.ffn_sparsity,
                              f"allowed: below {largest:.3f} for FFN width {shape.width} with round_to "
                              f"{request.round_to}", "it rounds the FFN to 0 channels, emptying every layer")
    if request.head_sparsity > 0:
        if shape.heads == 0:
            raise ConfigError("head_sparsity", request.head_sparsity, "allowed: 0 (no attention block found)")
        shapes_for(shape.heads, shape.kv_heads, request.head_sparsity, request.head_cut)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, ascending (ties: lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:count]
    return torch.tensor(sorted(order), dtype=torch.long)


def solve_width(costs: Sequence[LayerCosts], kept_layers: Sequence[int], heads: int, kv_heads: int,
                target: float, round_to: int) -> int:
    """The widest uniform FFN (a multiple of ``round_to``) whose decoder fits ``target`` × the dense count."""
    budget = target * sum(c.total for c in costs)
    base = sum(costs[i].params(0, heads, kv_heads) for i in kept_layers)
    per = sum(costs[i].per_channel for i in kept_layers)
    width = costs[kept_layers[0]].width
    fits = width if per == 0 else int((budget - base) // per)
    kept = min(width, fits // round_to * round_to)
    if kept < min(round_to, width):
        reach = (base + per * min(round_to, width)) / sum(c.total for c in costs)
        raise ConfigError("target_params", target, f"allowed: at least {reach:.3f} with the heads and layers as "
                          "requested", "the FFN alone cannot shrink further; add --head-sparsity or "
                          "--drop-layers")
    return kept


def _allocate(scores: dict[int, torch.Tensor], total: int, width: int, round_to: int) -> dict[int, int]:
    """Per-layer widths from a global ranking of standardised scores, each rounded to ``round_to``."""
    flat = torch.cat([standardized(scores[i]) for i in sorted(scores)])
    owner = torch.cat([torch.full((scores[i].numel(),), i) for i in sorted(scores)])
    chosen = owner[flat.argsort(descending=True, stable=True)[:total]]
    widths = {}
    for i in sorted(scores):
        count = int((chosen == i).sum())
        widths[i] = int(min(width, max(round_to, math.floor(count / round_to + 0.5) * round_to)))
    return widths


def _stat(by_index: dict[int, LayerStats], index: int, kind: str) -> object:
    found = by_index.get(index)
    return getattr(found, kind) if found is not None else None


def make_plan(model: nn.Module, layers: list[LayerGroups], stats: list[LayerStats], costs: list[LayerCosts],
              request: Request) -> StructuredPlan:
    """Decide what every layer keeps (see the module docstring)."""
    scorer = SCORES.get(request.method)
    by_index = {s.index: s for s in stats}
    influence = [by_index[g.index].influence if g.index in by_index else 0.0 for g in layers]
    drop = sorted(sorted(range(len(layers)), key=lambda i: (influence[i], i))[: request.drop_layers])
    kept = [g for g in layers if g.index not in drop]
    cuts = {g.index: LayerCut(g.index) for g in kept}

    shape: HeadShape | None = None
    attn = [g for g in kept if g.attention is not None]
    if request.head_sparsity > 0 and attn:
        first = attn[0].attention
        candidates = shapes_for(first.num_heads, first.num_kv_heads, request.head_sparsity, request.head_cut)
        head_scores = {g.index: scorer.heads(model, g.attention, _stat(by_index, g.index, "attention")) for g in attn}
        shape = choose_shape(list(head_scores.values()), first.num_kv_heads, candidates)
        for g in attn:
            keep, keep_kv, _ = keep_for_shape(head_scores[g.index], g.attention.num_kv_heads, shape)
            cuts[g.index].heads_keep, cuts[g.index].kv_keep = keep, keep_kv

    ffn = [g for g in kept if g.ffn is not None]
    widths: dict[int, int] = {}
    if ffn:
        width = ffn[0].ffn.width
        if request.target_params is not None:
            h = shape.heads if shape else costs[ffn[0].index].heads
            kv = shape.groups if shape else costs[ffn[0].index].kv_heads
            uniform = solve_width(costs, [g.index for g in kept], h, kv, request.target_params, request.round_to)
        else:
            uniform = round_width(width, request.ffn_sparsity or 0.0, request.round_to)
        if uniform < width:
            scores = {g.index: scorer.ffn(model, g.ffn, _stat(by_index, g.index, "ffn")) for g in ffn}
            widths = (_allocate(scores, uniform * len(ffn), width, request.round_to) if request.non_uniform
                      else {g.index: uniform for g in ffn})
            for g in ffn:
                if widths[g.index] < width:
                    cuts[g.index].ffn_keep = _top(scores[g.index], widths[g.index])
        else:
            widths = {g.index: width for g in ffn}
    return StructuredPlan(request.method, drop, cuts, widths, shape, influence)
