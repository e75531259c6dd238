"""GLUE and SQuAD v1.1 fine-tune / prune / distil recipes (the original INC pruning examples, as a library).

Entry points: :func:`run_glue`, :func:`run_squad` (parsed flags, see :mod:`prunekit.recipes.args`), the console
commands ``prunekit-glue`` / ``prunekit-squad``; building blocks: :mod:`~prunekit.recipes.data`,
:mod:`~prunekit.recipes.metrics`, :mod:`~prunekit.recipes.distill`, :mod:`~prunekit.recipes.train`,
:mod:`~prunekit.recipes.outputs`. Nothing heavy is imported until used.
"""
from __future__ import annotations

__all__ = ["run_glue", "run_squad", "glue_parser", "squad_parser", "RecipeError", "plan_steps"]


def __getattr__(name):
    if name == "run_glue":
        from prunekit.recipes.glue import run_glue

        return run_glue
    if name == "run_squad":
        from prunekit.recipes.squad import run_squad

        return run_squad
    if name in {"glue_parser", "squad_parser"}:
        from prunekit.recipes import args

        return getattr(args, name)
    if name == "RecipeError":
        from prunekit.recipes.common import RecipeError

        return RecipeError
    if name == "plan_steps":
        from prunekit.recipes.steps import plan_steps

        return plan_steps
    raise AttributeError(f"module 'prunekit.recipes' has no attribute {name!r}")
