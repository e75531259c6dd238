"""Executing a :class:`~.plan.StructuredPlan`: drop layers, correct the next layers, cut through prunekit.slimming.

Order: (1) dropped blocks leave the decoder ``ModuleList``, the survivors' ``layer_idx`` is renumbered (the KV
cache indexes layers by it) and ``num_hidden_layers`` / ``layer_types`` follow; (2) the groups are detected again
on the shorter model (so every recorded name is the final one); (3) each consumer (FFN second linear, attention
output projection) gets its compensation while its removed columns still exist; (4) the cuts run through
:func:`prunekit.slimming.apply.apply_plan` and the shapes go into the config with
:func:`prunekit.slimming.hf_config.update_config` — the same machinery as ``prunekit.slim``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.oneshot.structure import DecoderStructure, find_decoder
from prunekit.oneshot.structured import compensate
from prunekit.oneshot.structured.importance import LayerGroups, LayerStats
from prunekit.oneshot.structured.plan import StructuredPlan
from prunekit.slimming.apply import apply_plan as slim_apply
from prunekit.slimming.detect import detect
from prunekit.slimming.groups import AttentionGroup, FFNGroup
from prunekit.slimming.hf_config import update_config
from prunekit.slimming.layers import layer_ops
from prunekit.slimming.plan import AttentionCut, FFNCut, SlimPlan


@dataclass
class Applied:
    """What was done, for the report."""

    kept_layers: list[int]                      # original indices, in new order
    compensation: dict[str, str] = field(default_factory=dict)   # kind -> bias | lstsq | none
    bias_flags: list[str] = field(default_factory=list)


def layer_groups(model: nn.Module, structure: DecoderStructure, detection: Any = None) -> list[LayerGroups]:
    """The FFN and attention group of every decoder layer (``detection`` from prunekit.slimming.detect)."""
    detection = detection or detect(model)
    out = []
    for i in range(len(structure)):
        prefix = structure.layer_name(i) + "."
        ffn = next((g for g in detection.ffn if g.consumer.startswith(prefix)), None)
        attn = next((g for g in detection.attention if g.o.startswith(prefix)), None)
        out.append(LayerGroups(i, ffn, attn))
    return out


def drop_layers(model: nn.Module, structure: DecoderStructure, drop: list[int]) -> DecoderStructure:
    """Remove blocks ``drop`` from the decoder stack; renumber ``layer_idx``; update the layer count config."""
    if not drop:
        return structure
    kept = [b for i, b in enumerate(structure.layers) if i not in set(drop)]
    parent_name, _, attr = structure.path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = getattr(model, "config", None)
    if config is not None:
        old = len(structure)
        config.num_hidden_layers = len(kept)  # attribute_map turns it into n_layer for GPT-2
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == old:
            config.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    return find_decoder(model)


def _members(group: FFNGroup | AttentionGroup) -> list[str]:
    return [*group.producers, group.consumer] if isinstance(group, FFNGroup) else group.modules


def _add_zero_biases(model: nn.Module, groups: list[FFNGroup | AttentionGroup]) -> None:
    for group in groups:
        for name in _members(group):
            module = model.get_submodule(name)
            if getattr(module, "bias", None) is None:
                ops = layer_ops(module)
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(ops.out_features(module), dtype=w.dtype, device=w.device),
                                           requires_grad=w.requires_grad)


def _correct(model: nn.Module, consumer_name: str, stats: Any, keep: torch.Tensor, mode: str) -> None:
    """Apply ``mode`` (bias | lstsq) to ``consumer_name`` before its columns outside ``keep`` are cut."""
    module = model.get_submodule(consumer_name)
    w2d = layer_ops(module).weight_2d(module)
    removed = torch.tensor(sorted(set(range(w2d.shape[1])) - set(keep.tolist())), dtype=torch.long)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        if mode == "bias":
            new_bias = compensate.fold_mean(w2d.detach(), bias, stats.mean, removed.to(w2d.device))
            bias.copy_(new_bias.to(bias.dtype))
        elif mode == "lstsq":
            new_w, new_b = compensate.least_squares(w2d.detach(), bias, stats, keep)
            w2d[:, keep.to(w2d.device)] = new_w.to(w2d.dtype).to(w2d.device)
            if new_b is not None:
                bias.copy_(new_b.to(bias.dtype).to(bias.device))


def _prepare_biases(model: nn.Module, kind: str, mode: str, groups: list[Any], applied: Applied) -> None:
    if mode != "bias" or not groups:
        return
    consumer = model.get_submodule(groups[0].consumer if kind == "ffn" else groups[0].o)
    if getattr(consumer, "bias", None) is None:
        flag = compensate.bias_flag(model.config, kind)
        _add_zero_biases(model, groups)
        setattr(model.config, flag, True)
        applied.bias_flags.append(flag)


def apply_structured(model: nn.Module, structure: DecoderStructure, plan: StructuredPlan, stats: list[LayerStats],
                     compensation: dict[str, str]) -> tuple[DecoderStructure, Applied]:
    """Cut ``model`` in place as ``plan`` says; ``compensation`` maps ffn/attention to a mode of
    :data:`~.compensate.COMPENSATIONS`. Returns the new decoder structure and what was applied."""
    by_index = {s.index: s for s in stats}
    kept = [i for i in range(len(structure)) if i not in set(plan.drop)]
    structure = drop_layers(model, structure, plan.drop)
    layers = layer_groups(model, structure)
    applied = Applied(kept)

    ffn_cut = [(g, kept[g.index]) for g in layers
               if g.ffn is not None and plan.cuts[kept[g.index]].ffn_keep is not None]
    attn_cut = [(g, kept[g.index]) for g in layers
                if g.attention is not None and plan.cuts[kept[g.index]].heads_keep is not None]
    modes = {}
    for kind, cut, member in (("ffn", ffn_cut, "consumer"), ("attention", attn_cut, "o")):
        if not cut:
            continue
        consumer = model.get_submodule(getattr(getattr(cut[0][0], kind), member))
        modes[kind] = compensate.resolve(compensation.get(kind, "none"), model, consumer, kind)
        applied.compensation[kind] = modes[kind]
        all_groups = [getattr(g, kind) for g in layers if getattr(g, kind) is not None]
        _prepare_biases(model, kind, modes[kind], all_groups, applied)

    slim_plan = SlimPlan([], [], [])
    for g, old in ffn_cut:
        keep = plan.cuts[old].ffn_keep
        if modes["ffn"] != "none":
            _correct(model, g.ffn.consumer, by_index[old].ffn, keep, modes["ffn"])
        slim_plan.ffn.append(FFNCut(g.ffn, keep, []))
    for g, old in attn_cut:
        cut = plan.cuts[old]
        features = g.attention.feature_index("o", cut.heads_keep)
        if modes["attention"] != "none":
            _correct(model, g.attention.o, by_index[old].attention, features, modes["attention"])
        slim_plan.attention.append(AttentionCut(g.attention, cut.heads_keep, cut.kv_keep, []))
    ffn_after, attn_after = slim_apply(model, slim_plan)

    ffn_new = {a.consumer: a for a in ffn_after}
    attn_new = {a.name: a for a in attn_after}
    kept_heads = {c.group.name: c.keep_heads for c in slim_plan.attention}
    update_config(model,
                  [(g.ffn, ffn_new.get(g.ffn.consumer, g.ffn)) for g in layers if g.ffn is not None],
                  [(g.attention, attn_new.get(g.attention.name, g.attention), kept_heads.get(g.attention.name))
                   for g in layers if g.attention is not None])
    return structure, applied


__all__ = ["Applied", "apply_structured", "drop_layers", "layer_groups"]
