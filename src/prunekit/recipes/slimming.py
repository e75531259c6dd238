"""``--auto_slim``: prune FFN channels and attention heads found by dataflow, then cut them out and time it."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from prunekit.recipes.common import RecipeError
from prunekit.recipes.prune_config import RECIPE_PRUNER_DEFAULTS
from prunekit.recipes.steps import StepPlan

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def check_args(args) -> None:
    """``--auto_slim`` decides the patterns itself: refuse flags that would contradict it."""
    if not getattr(args, "auto_slim", False):
        return
    if not args.do_prune:
        raise RecipeError("--auto_slim prunes and then slims: add --do_prune")
    for flag in ("pruning_config", "pruning_pattern"):
        if getattr(args, flag, None):
            raise RecipeError(f"--auto_slim chooses the patterns (channelx1 on FFNs, mha on attention); "
                              f"drop --{flag}")
    for flag in ("ffn2_sparsity", "mha_sparsity"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            raise RecipeError(f"--{flag}: got {value}; must be in [0, 1)")
    if args.ffn2_sparsity == 0.0 and args.mha_sparsity == 0.0:
        raise RecipeError("--auto_slim needs --ffn2_sparsity or --mha_sparsity above 0")


def auto_slim_config(args, plan: StepPlan, model: torch.nn.Module):
    """The pruning config: the recipe's criterion/scope/decay on auto-detected FFN and attention structures."""
    from prunekit.config import PruningConfig
    from prunekit.slimming import auto_slim_configs

    overrides = {k: v for k, v in RECIPE_PRUNER_DEFAULTS.items()
                 if k in ("pruning_type", "pruning_scope", "sparsity_decay_type", "max_sparsity_ratio_per_op")}
    for key in ("pruning_type", "pruning_scope", "sparsity_decay_type"):
        if getattr(args, key, None):
            overrides[key] = getattr(args, key)
    local = auto_slim_configs(model, ffn2_sparsity=args.ffn2_sparsity, mha_sparsity=args.mha_sparsity,
                              **overrides)
    return PruningConfig.from_kwargs(pruning_configs=local, start_step=plan.start_step, end_step=plan.end_step,
                                     pruning_frequency=plan.pruning_frequency)


def _latency(model: torch.nn.Module, inputs: dict, runs: int) -> float:
    with torch.inference_mode():
        model(**inputs)  # warm-up
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def slim_and_time(model: torch.nn.Module, pruning, batch: dict, runs: int = 10) -> dict[str, Any]:
    """End pruning (zeros stay), time the masked model, slim it, time it again; the slimming report as a dict."""
    from prunekit.slimming import slim

    pruning.detach(remove_masks=True)
    inputs = {k: v for k, v in batch.items() if k in _INPUT_KEYS}
    was_training = model.training
    model.eval()
    before = _latency(model, inputs, runs)
    params_before = sum(p.numel() for p in model.parameters())
    report = slim(model)
    after = _latency(model, inputs, runs)
    model.train(was_training)
    return {"latency_before_s": before, "latency_after_s": after, "speedup": before / after,
            "batch_shape": list(inputs["input_ids"].shape), "runs": runs,
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "report": report.to_dict() if hasattr(report, "to_dict") else str(report),
            "table": report.table()}
