"""Importance of FFN channels, attention heads and whole decoder layers, from one calibration pass.

:func:`collect_stats` runs the sequential pipeline (prunekit.oneshot.pipeline) over the *dense* model and keeps,
per decoder layer, the input statistics of the FFN's second linear (one feature per intermediate channel) and
of the attention output projection (``head_dim`` features per head), plus the layer's block influence
``1 - mean cos(input, output)`` over tokens (ShortGPT). Every score and every compensation is then computed
from these statistics, so one pass serves every method, width and bench point.

Scores (:data:`SCORES`, higher = more important), per input feature ``j`` of the next weight ``W`` (``[out, in]``):

* ``flap``: ``var(X_j) * ||W[:, j]||²`` (FLAP's fluctuation: a channel that barely varies is a constant, which
  the bias fold then restores);
* ``wanda-sp``: ``sum_i |W[i, j]| * ||X_j||`` (Wanda's score summed over the channel's column);
* ``weight-norm``: the L2 norm of every weight the unit owns (no calibration data; the baseline).

A head's score is the sum over its features (weight-norm: the norm over its q rows and o columns, and its k/v
rows when it owns them alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from prunekit.oneshot.pipeline import LayerContext, run_sequential
from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import DecoderStructure
from prunekit.registry import Registry
from prunekit.slimming.groups import AttentionGroup, FFNGroup
from prunekit.slimming.layers import layer_ops


@dataclass
class LayerGroups:
    """The FFN and attention groups of one decoder layer (names are qualified model names)."""

    index: int
    ffn: FFNGroup | None
    attention: AttentionGroup | None


@dataclass
class LayerStats:
    """What calibration measured in one layer: its FFN/attention input statistics and its block influence."""

    index: int
    ffn: InputStats | None = None
    attention: InputStats | None = None
    influence: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def weight_2d(model: nn.Module, name: str) -> torch.Tensor:
    """``[out, in]`` float32 view-copy of a layer's weight (HF Conv1D transposed)."""
    module = model.get_submodule(name)
    return layer_ops(module).weight_2d(module).detach().float()


def _relative(block_name: str, name: str) -> str:
    return name[len(block_name) + 1:]


class _Influence:
    """Running mean over tokens of cos(block input, block output)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def hook(self, _module: nn.Module, args: tuple, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
        self.total += float(cos.sum())
        self.count += cos.numel()

    @property
    def value(self) -> float:
        return 1.0 - self.total / max(self.count, 1)


def collect_stats(model: nn.Module, batches: Iterable[Any], layers: list[LayerGroups], structure: DecoderStructure,
                  *, hessian: bool = False, device: torch.device | str | None = None,
                  progress: bool = True) -> list[LayerStats]:
    """One sequential pass over the dense model; per layer the statistics the scores and compensations read.

    ``hessian`` also keeps ``E[x xᵀ]`` of the FFN/attention inputs (needed by the least-squares compensation).
    """
    kinds = ("mean", "var", "sq_norm") + (("hessian",) if hessian else ())
    by_index = {g.index: g for g in layers}
    result: list[LayerStats] = []

    def on_layer(ctx: LayerContext) -> None:
        groups = by_index[ctx.index]
        linears = {}
        if groups.ffn is not None:
            linears["ffn"] = ctx.block.get_submodule(_relative(ctx.name, groups.ffn.consumer))
        if groups.attention is not None:
            linears["attention"] = ctx.block.get_submodule(_relative(ctx.name, groups.attention.o))
        influence = _Influence()
        handle = ctx.block.register_forward_hook(influence.hook)
        try:
            stats = ctx.collect(linears, kinds)
        finally:
            handle.remove()
        for s in stats.values():  # statistics wait on the CPU: the device holds one block at a time
            for attr in ("_xtx", "_sum", "_sumsq"):
                if getattr(s, attr) is not None:
                    setattr(s, attr, getattr(s, attr).cpu())
        result.append(LayerStats(ctx.index, stats.get("ffn"), stats.get("attention"), influence.value))

    run_sequential(model, batches, on_layer, structure=structure, device=device, progress=progress,
                   desc="calibration")
    return result


# --- scores ---------------------------------------------------------------------------------------------------
# A scorer maps (model, group, stats or None) to one score per unit (channel or query head).
FFNScorer = Callable[[nn.Module, FFNGroup, InputStats | None], torch.Tensor]
HeadScorer = Callable[[nn.Module, AttentionGroup, InputStats | None], torch.Tensor]


@dataclass(frozen=True)
class Scorer:
    ffn: FFNScorer
    heads: HeadScorer
    needs_data: bool = True


SCORES: Registry[Scorer] = Registry("method")


def per_head(group: AttentionGroup, feature_scores: torch.Tensor) -> torch.Tensor:
    """Sum of per-feature scores of the o input over each query head's ``head_dim`` features."""
    return torch.stack([feature_scores[group.feature_index("o", [h])].sum() for h in range(group.num_heads)])


def _flap_features(w: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return stats.var.float().cpu() * w.pow(2).sum(0).cpu()


def _wanda_features(w: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return w.abs().sum(0).cpu() * stats.sq_norm.float().cpu().sqrt()


SCORES.register("flap")(Scorer(
    ffn=lambda model, g, s: _flap_features(weight_2d(model, g.consumer), s),
    heads=lambda model, g, s: per_head(g, _flap_features(weight_2d(model, g.o), s))))
SCORES.register("wanda-sp")(Scorer(
    ffn=lambda model, g, s: _wanda_features(weight_2d(model, g.consumer), s),
    heads=lambda model, g, s: per_head(g, _wanda_features(weight_2d(model, g.o), s))))


def _norm_ffn(model: nn.Module, group: FFNGroup, _stats: InputStats | None) -> torch.Tensor:
    sq = weight_2d(model, group.consumer).pow(2).sum(0)
    for producer in group.producers:
        sq = sq + weight_2d(model, producer).pow(2).sum(1)
    return sq.sqrt().cpu()


def _norm_heads(model: nn.Module, group: AttentionGroup, _stats: InputStats | None) -> torch.Tensor:
    q, o = weight_2d(model, group.q), weight_2d(model, group.o)
    k, v = weight_2d(model, group.k), weight_2d(model, group.v)
    out = []
    for h in range(group.num_heads):
        sq = q[group.feature_index("q", [h])].pow(2).sum() + o[:, group.feature_index("o", [h])].pow(2).sum()
        if group.heads_per_kv == 1:  # the head owns its k/v rows alone
            sq = sq + k[group.feature_index("k", [h])].pow(2).sum() + v[group.feature_index("v", [h])].pow(2).sum()
        out.append(sq.sqrt())
    return torch.stack(out).cpu()


SCORES.register("weight-norm")(Scorer(ffn=_norm_ffn, heads=_norm_heads, needs_data=False))


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` within one layer, so scores of different layers can be ranked together (FLAP)."""
    std = scores.std()
    return (scores - scores.mean()) / (std if float(std) > 0 else 1.0)
