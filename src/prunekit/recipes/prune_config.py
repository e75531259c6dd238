"""The recipes' pruning configuration: the original examples' defaults, flags, or a YAML file plus the step plan."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.recipes.common import RecipeError
from prunekit.recipes.steps import StepPlan

#: Heads are never pruned: the pooler, sequence-classification heads, the QA span head (re.search regexes).
DEFAULT_EXCLUDED_OP_NAMES = ["pooler", "classifier", "qa_outputs"]

#: Local pruner dict of the original GLUE / QA examples (section 10.1 of the reference notes).
RECIPE_PRUNER_DEFAULTS: dict[str, Any] = {
    "pruning_type": "snip_momentum",
    "pruning_scope": "global",
    "sparsity_decay_type": "exp",
    "excluded_op_names": DEFAULT_EXCLUDED_OP_NAMES,
    "pruning_op_types": ["Linear"],
    "max_sparsity_ratio_per_op": 0.98,
}

DEFAULT_TARGET_SPARSITY = 0.9
DEFAULT_PATTERN = "4x1"


def _engine():
    try:
        from prunekit.config import PruningConfig, load_config
    except ImportError as exc:  # pragma: no cover - only while the engine is missing
        raise RecipeError(f"the prunekit pruning engine is not importable ({exc})") from exc
    return PruningConfig, load_config


def _global_kwargs(args, plan: StepPlan) -> dict[str, Any]:
    return {
        "target_sparsity": args.target_sparsity if args.target_sparsity is not None else DEFAULT_TARGET_SPARSITY,
        "pattern": args.pruning_pattern if args.pruning_pattern is not None else DEFAULT_PATTERN,
        "start_step": plan.start_step,
        "end_step": plan.end_step,
        "pruning_frequency": plan.pruning_frequency,
    }


def _local_dict(args) -> dict[str, Any]:
    local = dict(RECIPE_PRUNER_DEFAULTS)
    local["excluded_op_names"] = list(DEFAULT_EXCLUDED_OP_NAMES)
    if getattr(args, "pruning_type", None):
        local["pruning_type"] = args.pruning_type
    if getattr(args, "pruning_scope", None):
        local["pruning_scope"] = args.pruning_scope
    if getattr(args, "sparsity_decay_type", None):
        local["sparsity_decay_type"] = args.sparsity_decay_type
    if getattr(args, "excluded_op_names", None) is not None:
        local["excluded_op_names"] = list(args.excluded_op_names)
    return local


def _from_yaml(path: str, args, plan: StepPlan):
    """A YAML file's keys win; the flags and the step plan fill in what it leaves out (2.x / list forms)."""
    import yaml

    _, load_config = _engine()
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"--pruning_config: file {path!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"--pruning_config: {path!r} is not valid YAML ({first})") from exc
    defaults = _global_kwargs(args, plan)
    if isinstance(raw, list):  # a list of local pruner dicts
        raw = {"pruning_configs": raw}
    if isinstance(raw, dict) and "pruning_configs" in raw:
        merged = dict(raw)
        for key, value in defaults.items():
            merged.setdefault(key, value)
        return load_config(merged)
    if isinstance(raw, dict) and any(k in raw for k in ("target_sparsity", "pattern", "pruning_type")) \
            and not any(k in raw for k in ("pruning", "weight_compression", "weight_compression_pytorch")):
        merged = dict(raw)  # a single flat dict of global keys
        for key, value in defaults.items():
            merged.setdefault(key, value)
        merged.setdefault("pruning_configs", [{}])
        return load_config(merged)
    return load_config(str(p))  # 1.x YAML: its own steps


def build_pruning_config(args, plan: StepPlan):
    """The :class:`prunekit.config.PruningConfig` of a recipe run (raises ``ConfigError`` for bad combinations)."""
    PruningConfig, _ = _engine()
    if getattr(args, "pruning_config", None):
        return _from_yaml(args.pruning_config, args, plan)
    return PruningConfig.from_kwargs(pruning_configs=[_local_dict(args)], **_global_kwargs(args, plan))


def describe(config) -> Any:
    """A JSON-able view of a config for run_args / metrics files."""
    for attr in ("to_dict", "model_dump", "dict"):
        fn = getattr(config, attr, None)
        if callable(fn):
            try:
                return fn()
            except Exception:  # noqa: BLE001
                continue
    return repr(config)
