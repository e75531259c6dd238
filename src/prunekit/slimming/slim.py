"""``slim(model)``: detect groups, plan the cuts, cut, update configs, report."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from prunekit.errors import SlimmingError
from prunekit.slimming.apply import apply_plan
from prunekit.slimming.detect import Detection, detect
from prunekit.slimming.hf_config import update_config
from prunekit.slimming.layers import layer_ops
from prunekit.slimming.plan import SlimPlan, Skip, make_plan
from prunekit.slimming.report import AttentionChange, FFNChange, SlimReport
from prunekit.slimming.structure import ATTENTION_RULES, FFN_RULES

NOT_FOUND = (
    "found no FFN block (a layer reading only other layers' outputs through element-wise ops, mapping the model "
    "width back to itself) and no attention block (q/k/v projections feeding scaled_dot_product_attention or "
    "softmax(q @ kᵀ) @ v, read by an output projection)")


def nothing_found(detection: Detection) -> SlimmingError:
    """The error for a model without any group, saying what was looked for."""
    message = NOT_FOUND
    if detection.trace_error:
        rules = ", ".join(f"{'/'.join(r.producers)}->{r.consumer}" for r in FFN_RULES)
        heads = ", ".join(f"{r.q}/{r.k}/{r.v}->{r.o}" for r in ATTENTION_RULES)
        message += (f"; tracing failed ({detection.trace_error}) and no module matched the structure rules "
                    f"(FFN: {rules}; attention: {heads})")
    if detection.rejected:
        message += "; rejected: " + "; ".join(f"{r.layer}: {r.reason}" for r in detection.rejected[:5])
    return SlimmingError(message)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stray_zeros(model: nn.Module, detection: Detection, plan: SlimPlan) -> list[Skip]:
    """Zero columns or rows that no group covers, so the report never skips them silently."""
    skipped: list[Skip] = []
    members = {n for g in detection.ffn for n in [g.consumer, *g.producers]}
    members |= {n for g in detection.attention for n in g.modules}
    reasons = {r.layer: r.reason for r in detection.rejected}
    for name, module in model.named_modules():
        ops = layer_ops(module)
        if ops is None or name in members:
            continue
        zero_cols = (~ops.weight_2d(module).detach().ne(0).any(dim=0)).nonzero().flatten().tolist()
        if zero_cols:
            why = reasons.get(name, "not the second layer of a detected FFN block or an attention output "
                                    "projection, so its input features cannot be removed")
            skipped.append(Skip(name, "layer", f"zero input columns left in place: {why}", zero_cols))
    for group in detection.ffn:
        consumer = model.get_submodule(group.consumer)
        live_cols = layer_ops(consumer).weight_2d(consumer).detach().ne(0).any(dim=0)
        for producer_name in group.producers:
            producer = model.get_submodule(producer_name)
            rows = layer_ops(producer).weight_2d(producer).detach().ne(0).any(dim=1)
            stray = (~rows & live_cols).nonzero().flatten().tolist()
            if stray:
                skipped.append(Skip(producer_name, "ffn", f"zero rows whose channel is still read by "
                                    f"{group.consumer} (activation(bias) may be non-zero); zero the consumer's "
                                    "columns (channelx1) to remove them", stray))
    return skipped


def slim(model: nn.Module, round_to: int = 1, scores: Mapping[str, torch.Tensor] | None = None, *,
         example_inputs: Any = None, dataloader: Iterable | None = None, detection: Detection | None = None,
         allow_empty_layers: bool = False, method: str = "auto") -> SlimReport:
    """Physically remove every all-zero FFN channel and every pruned attention head of ``model``, in place.

    * FFN: a channel whose column in the second layer is all zero goes, with the first layer(s)' rows and bias.
      ``round_to`` keeps each width a multiple of it by keeping the highest-scoring zero channels
      (``scores[consumer or group name]``: one score per channel; default: L2 norm of the channel's weights).
    * Attention: a head whose q rows and o columns are all zero goes; see :mod:`prunekit.slimming.plan` for
      grouped-query attention. ``scores[attention group name]`` (one per head) picks which zero heads stay
      when not all can go.
    * Outputs stay equal to the masked model's. Attention modules' head counts/sizes and ``model.config`` are
      updated (see :mod:`prunekit.slimming.hf_config`). Optimizers must be rebuilt: parameters are new objects.

    Raises SlimmingError when no group is found, when a block would lose every channel/head (unless
    ``allow_empty_layers``), or when a layer still carries pruning masks. Nothing is modified on error.
    """
    detection = detection or detect(model, example_inputs, method=method, dataloader=dataloader)
    if not detection.ffn and not detection.attention:
        raise nothing_found(detection)
    plan = make_plan(model, detection.ffn, detection.attention, round_to, scores, allow_empty_layers)
    skipped = plan.skipped + _stray_zeros(model, detection, plan)
    before = _param_count(model)
    ffn_after, attention_after = apply_plan(model, plan)

    ffn_new = {g.consumer: g for g in ffn_after}
    attn_new = {g.name: g for g in attention_after}
    kept = {c.group.name: c.keep_heads for c in plan.attention}
    update_config(model,
                  [(g, ffn_new.get(g.consumer, g)) for g in detection.ffn],
                  [(g, attn_new.get(g.name, g), kept.get(g.name)) for g in detection.attention])

    report = SlimReport(not_cut=skipped, params_before=before, params_after=_param_count(model),
                        detection=detection.method, trace_error=detection.trace_error)
    for cut in plan.ffn:
        g = cut.group
        removed = sorted(set(range(g.width)) - set(cut.keep.tolist()))
        report.ffn.append(FFNChange(g.name, g.consumer, list(g.producers), g.width, int(cut.keep.numel()), removed))
    for cut in plan.attention:
        g = cut.group
        report.attention.append(AttentionChange(
            g.name, g.num_heads, len(cut.keep_heads), g.num_kv_heads, len(cut.keep_kv), g.head_dim,
            sorted(set(range(g.num_heads)) - set(cut.keep_heads)),
            sorted(set(range(g.num_kv_heads)) - set(cut.keep_kv))))
    return report
