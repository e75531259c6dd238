"""Deciding what to remove, before anything is touched.

A channel of an FFN group is *zero* when its input column in the consumer is all zero: whatever the producers
write there is multiplied by zero, so removing it (with the producers' rows and bias entries) leaves outputs
unchanged. A query head is *zero* when its q rows and its o columns are all zero (weights only: with its o
columns zero the head adds nothing to the output, whatever the q/k/v biases hold). Key/value head ``g`` goes
only when every query head reading it goes; its k/v rows are then unused, so they need not be zero.

Grouped-query attention stays legal only if every key/value head keeps the same number of query heads
(``num_heads = num_kv_heads * heads_per_kv``). So after removing fully-zero kv groups, each remaining group drops
``r = min(zero query heads over the remaining groups)`` heads, the lowest-scoring of its zero heads; any other
zero heads stay (as zeros) and are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from prunekit.errors import ConfigError, SlimmingError
from prunekit.slimming.groups import AttentionGroup, FFNGroup
from prunekit.slimming.layers import layer_ops


@dataclass
class Skip:
    """Something zero that is not removed, and why."""

    name: str
    kind: str          # "ffn" | "attention" | "layer"
    reason: str
    indices: list[int] = field(default_factory=list)


@dataclass
class FFNCut:
    group: FFNGroup
    keep: torch.Tensor          # kept channels, ascending
    zero: list[int]             # every zero channel


@dataclass
class AttentionCut:
    group: AttentionGroup
    keep_heads: list[int]       # kept query heads, ascending (grouped by kv head)
    keep_kv: list[int]          # kept key/value heads, ascending
    zero_heads: list[int]       # every zero query head


@dataclass
class SlimPlan:
    ffn: list[FFNCut]
    attention: list[AttentionCut]
    skipped: list[Skip]


def _w2d(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return layer_ops(module).weight_2d(module).detach()


def _scores_for(scores: Mapping[str, torch.Tensor] | None, keys: list[str], size: int,
                default: torch.Tensor) -> torch.Tensor:
    if scores is None:
        return default
    for key in keys:
        if key in scores:
            value = torch.as_tensor(scores[key]).detach().flatten().float().cpu()
            if value.numel() != size:
                raise ConfigError(f"scores[{key!r}]", tuple(value.shape), f"a tensor of {size} scores")
            return value
    return default


def _top(candidates: list[int], score: torch.Tensor, count: int) -> list[int]:
    """The ``count`` highest-scoring candidates (ties: lower index first), deterministic."""
    ranked = sorted(candidates, key=lambda i: (-float(score[i]), i))
    return ranked[:count]


# --------------------------------------------------------------------------------------------------------------
def plan_ffn(model: nn.Module, group: FFNGroup, round_to: int, scores: Mapping[str, torch.Tensor] | None,
             allow_empty: bool) -> tuple[FFNCut | None, list[Skip]]:
    consumer = _w2d(model, group.consumer)                                   # [out, width]
    live = consumer.ne(0).any(dim=0)
    zero = (~live).nonzero().flatten().tolist()
    if not zero:
        return None, []
    norm = consumer.float().pow(2).sum(0)
    for p in group.producers:
        norm = norm + _w2d(model, p).float().pow(2).sum(1)
    score = _scores_for(scores, [group.consumer, group.name], group.width, norm.sqrt().cpu())
    n_live = int(live.sum())
    if n_live == 0 and not allow_empty:
        raise SlimmingError(
            f"{group.consumer}: every one of its {group.width} FFN channels is zero; removing them all empties "
            "the block (pass allow_empty_layers=True to allow it)")
    target = -(-n_live // round_to) * round_to
    skipped: list[Skip] = []
    if target > group.width:
        skipped.append(Skip(group.consumer, "ffn", f"width {group.width} with {n_live} non-zero channels cannot "
                            f"be cut to a multiple of round_to={round_to}", zero))
        return None, skipped
    extra = _top(zero, score, target - n_live)
    if extra:
        skipped.append(Skip(group.consumer, "ffn", f"kept {len(extra)} zero channels (highest score) so the width "
                            f"{target} is a multiple of round_to={round_to}", sorted(extra)))
    keep_mask = live.clone()
    keep_mask[extra] = True
    keep = keep_mask.nonzero().flatten()
    if keep.numel() == group.width:
        return None, skipped
    return FFNCut(group, keep, zero), skipped


# --------------------------------------------------------------------------------------------------------------
def _head_zero(model: nn.Module, group: AttentionGroup) -> tuple[list[bool], list[bool], list[bool], torch.Tensor]:
    """Per query head: q rows zero, o columns zero; plus a default score (L2 over everything it owns)."""
    q, o = _w2d(model, group.q), _w2d(model, group.o)
    k, v = _w2d(model, group.k), _w2d(model, group.v)
    q_zero, o_zero, scores = [], [], []
    for h in range(group.num_heads):
        rows = group.feature_index("q", [h])
        cols = group.feature_index("o", [h])
        q_zero.append(not bool(q[rows].ne(0).any()))
        o_zero.append(not bool(o[:, cols].ne(0).any()))
        s = q[rows].float().pow(2).sum() + o[:, cols].float().pow(2).sum()
        if group.heads_per_kv == 1:
            s = s + k[group.feature_index("k", [h])].float().pow(2).sum()
            s = s + v[group.feature_index("v", [h])].float().pow(2).sum()
        scores.append(float(s.sqrt()))
    dead = [a and b for a, b in zip(q_zero, o_zero)]
    return dead, q_zero, o_zero, torch.tensor(scores)


def plan_attention(model: nn.Module, group: AttentionGroup, scores: Mapping[str, torch.Tensor] | None,
                   allow_empty: bool) -> tuple[AttentionCut | None, list[Skip]]:
    dead, q_zero, o_zero, default = _head_zero(model, group)
    score = _scores_for(scores, [group.name, group.o], group.num_heads, default)
    skipped: list[Skip] = []
    partial = [h for h in range(group.num_heads) if (q_zero[h] or o_zero[h]) and not dead[h]]
    if partial:
        skipped.append(Skip(group.name, "attention", "heads with only their q rows or only their o columns zero "
                            "are not pruned heads", partial))
    zero_heads = [h for h in range(group.num_heads) if dead[h]]
    if not zero_heads:
        return None, skipped
    r = group.heads_per_kv
    dead_per_kv = {g: [h for h in group.query_heads_of(g) if dead[h]] for g in range(group.num_kv_heads)}
    keep_kv = [g for g, hs in dead_per_kv.items() if len(hs) < r]
    if not keep_kv:
        if not allow_empty:
            raise SlimmingError(
                f"{group.name}: all {group.num_heads} heads are zero; removing them all leaves an attention block "
                "with no head (pass allow_empty_layers=True to keep one zero head instead)")
        best = _top(zero_heads, score, 1)[0]
        skipped.append(Skip(group.name, "attention", "kept one zero head: an attention block cannot run with "
                            "no head", [best]))
        keep_kv, dead_per_kv = [group.kv_head_of(best)], {group.kv_head_of(best): []}
        keep_heads = [best]
    else:
        drop = min(len(dead_per_kv[g]) for g in keep_kv)
        keep_heads = []
        for g in keep_kv:
            gone = set(sorted(dead_per_kv[g], key=lambda h: (float(score[h]), h))[:drop])
            kept_zero = sorted(set(dead_per_kv[g]) - gone)
            if kept_zero:
                skipped.append(Skip(group.name, "attention", f"grouped-query attention: key/value head {g} keeps "
                                    f"{r - drop} query heads like every other kept group, so zero heads stay",
                                    kept_zero))
            keep_heads += [h for h in group.query_heads_of(g) if h not in gone]
    if len(keep_heads) == group.num_heads:
        return None, skipped
    return AttentionCut(group, sorted(keep_heads), sorted(keep_kv), zero_heads), skipped


# --------------------------------------------------------------------------------------------------------------
def make_plan(model: nn.Module, ffn: list[FFNGroup], attention: list[AttentionGroup], round_to: int = 1,
              scores: Mapping[str, torch.Tensor] | None = None, allow_empty_layers: bool = False) -> SlimPlan:
    """Decide every cut; raises before anything is modified."""
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ConfigError("round_to", round_to, "a positive integer")
    plan = SlimPlan([], [], [])
    for group in ffn:
        cut, skipped = plan_ffn(model, group, round_to, scores, allow_empty_layers)
        plan.skipped += skipped
        if cut is not None:
            plan.ffn.append(cut)
    for group in attention:
        cut, skipped = plan_attention(model, group, scores, allow_empty_layers)
        plan.skipped += skipped
        if cut is not None:
            plan.attention.append(cut)
    return plan
