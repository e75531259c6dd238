"""Executing a :class:`~prunekit.slimming.plan.SlimPlan`: cut the layers, then fix the modules' size attributes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from prunekit.errors import SlimmingError
from prunekit.masks import owner_of, release_masks, schedule_state
from prunekit.slimming.groups import AttentionGroup, FFNGroup, resized
from prunekit.slimming.layers import attached_masks, layer_ops
from prunekit.slimming.plan import AttentionCut, FFNCut, SlimPlan

# Attribute name -> new value, for the modules between a group's container and its layers. A value is replaced
# only when it equals what the attribute described before the cut (so unrelated attributes of the same name
# are left alone).
AttrRule = Callable[[AttentionGroup, AttentionGroup], tuple[int, int]]  # (old, new)

ATTENTION_ATTRS: dict[str, AttrRule] = {}
for _name in ("num_attention_heads", "num_heads", "n_heads", "n_head"):
    ATTENTION_ATTRS[_name] = lambda old, new: (old.num_heads, new.num_heads)
for _name in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
    ATTENTION_ATTRS[_name] = lambda old, new: (old.num_kv_heads, new.num_kv_heads)
ATTENTION_ATTRS["num_key_value_groups"] = lambda old, new: (old.heads_per_kv, new.heads_per_kv)
for _name in ("all_head_size", "split_size", "inner_dim", "embed_dim"):
    # GPT-2 splits c_attn by split_size; OPT-style models reshape the attention output to embed_dim.
    ATTENTION_ATTRS[_name] = lambda old, new: (old.num_heads * old.head_dim, new.num_heads * new.head_dim)

FFN_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "d_ff")


def _path_modules(model: nn.Module, root: str, members: list[str]) -> list[nn.Module]:
    """The container ``root`` and every module between it and the member layers (the layers excluded)."""
    found: dict[str, nn.Module] = {}
    for member in members:
        parts = member.split(".")
        start = len(root.split(".")) if root else 0
        for end in range(start, len(parts)):
            name = ".".join(parts[:end])
            found.setdefault(name, model.get_submodule(name))
    return list(found.values())


def _set_equal(modules: list[nn.Module], names, old: int, new: int) -> None:
    for module in modules:
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, name, new)


def _finished_masks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules among ``names`` that carry masks, all of them final; raises while any schedule still runs.

    A mask whose schedule has finished (no event can change it again) has its zeros in the weight already, so it
    is folded: the original's flow ends with ``on_train_end()`` then ``model_slim(model)`` and nothing else."""
    holders = []
    for name in names:
        module = model.get_submodule(name) if name else model
        masks = attached_masks(module)
        if not masks:
            continue
        schedule = schedule_state(module)
        for mask in masks:
            if mask not in schedule:  # not attached by a prunekit schedule: nothing says it is final
                raise SlimmingError(f"{name} still carries pruning masks ({mask}); finish pruning first "
                                    "(Pruning.detach(remove_masks=True)) so that slimming cuts plain weights")
            if schedule[mask] is not None:
                raise SlimmingError(
                    f"{name or 'the model'} carries the mask {mask} of a pruning schedule that is still running "
                    f"(its last event is at step {schedule[mask]}); train past that step (finished masks are "
                    "folded into the weights by slimming) or end pruning now with Pruning.detach(remove_masks=True)")
        holders.append(module)
    return holders


def _fold(holders: list[nn.Module]) -> None:
    """End the pruning behind finished masks: its owner is detached (hooks and masks go), stray masks dropped."""
    for module in holders:
        owner = owner_of(module)
        if owner is not None:
            owner.detach(remove_masks=True)
        release_masks(module)


def cut_ffn(model: nn.Module, cut: FFNCut) -> FFNGroup:
    """Remove every channel of ``cut.group`` not in ``cut.keep``; returns the group at its new width."""
    group, keep = cut.group, cut.keep
    consumer = model.get_submodule(group.consumer)
    layer_ops(consumer).keep_in(consumer, keep)
    for name in group.producers:
        producer = model.get_submodule(name)
        layer_ops(producer).keep_out(producer, keep)
    holders = _path_modules(model, group.name, group.producers + [group.consumer])
    _set_equal(holders, FFN_WIDTH_ATTRS, group.width, int(keep.numel()))
    return FFNGroup(group.name, list(group.producers), group.consumer, int(keep.numel()), group.source)


def _keep_features(group: AttentionGroup, keep_heads: list[int], keep_kv: list[int]) -> dict[str, torch.Tensor]:
    """Kept output features per q/k/v layer (a fused layer gets its roles' features in offset order)."""
    roles = sorted(("q", "k", "v"), key=lambda r: (getattr(group, r), getattr(group, f"{r}_offset")))
    per_layer: dict[str, list[torch.Tensor]] = {}
    for role in roles:
        heads = keep_heads if role == "q" else keep_kv
        per_layer.setdefault(getattr(group, role), []).append(group.feature_index(role, heads))
    return {layer: torch.cat(parts) for layer, parts in per_layer.items()}


def _check_covered(model: nn.Module, group: AttentionGroup) -> None:
    """A fused layer may be cut only if q, k and v account for all of its outputs."""
    widths: dict[str, int] = {}
    for role in "qkv":
        count = group.num_heads if role == "q" else group.num_kv_heads
        widths[getattr(group, role)] = widths.get(getattr(group, role), 0) + count * group.head_dim
    for layer, width in widths.items():
        module = model.get_submodule(layer)
        if layer_ops(module).out_features(module) != width:
            raise SlimmingError(f"{group.name}: {layer} writes {layer_ops(module).out_features(module)} features, "
                                f"q/k/v account for {width}; cannot cut it per head")


def cut_attention(model: nn.Module, cut: AttentionCut) -> AttentionGroup:
    """Remove every head of ``cut.group`` not kept; returns the group with its new head counts."""
    group = cut.group
    _check_covered(model, group)
    for layer, keep in _keep_features(group, cut.keep_heads, cut.keep_kv).items():
        module = model.get_submodule(layer)
        layer_ops(module).keep_out(module, keep)
    o = model.get_submodule(group.o)
    layer_ops(o).keep_in(o, group.feature_index("o", cut.keep_heads))
    new = resized(group, len(cut.keep_heads), len(cut.keep_kv))
    holders = _path_modules(model, group.name, group.modules)
    for attr, rule in ATTENTION_ATTRS.items():
        old_value, new_value = rule(group, new)
        _set_equal(holders, (attr,), old_value, new_value)
    _update_pruned_heads(holders, group, cut.keep_heads)
    return new


def _update_pruned_heads(holders: list[nn.Module], group: AttentionGroup, keep_heads: list[int]) -> None:
    """transformers < 5 keeps ``pruned_heads`` (a set of original head indices) on attention modules."""
    for module in holders:
        pruned = getattr(module, "pruned_heads", None)
        if isinstance(pruned, set):
            original = [h for h in range(group.num_heads + len(pruned)) if h not in pruned]
            pruned |= {original[h] for h in range(group.num_heads) if h not in keep_heads}


def apply_plan(model: nn.Module, plan: SlimPlan) -> tuple[list[FFNGroup], list[AttentionGroup]]:
    """Cut everything in ``plan``; returns the groups as they are afterwards."""
    layers = [n for c in plan.ffn for n in [c.group.consumer, *c.group.producers]]
    layers += [n for c in plan.attention for n in c.group.modules]
    layers += [c.group.name for c in plan.attention]  # the mha pattern keeps its head mask on the container
    holders = _finished_masks(model, list(dict.fromkeys(layers)))
    for c in plan.attention:
        _check_covered(model, c.group)
    _fold(holders)  # everything is checked: from here on the model changes
    with torch.no_grad():
        ffn = [cut_ffn(model, c) for c in plan.ffn]
        attention = [cut_attention(model, c) for c in plan.attention]
    return ffn, attention
