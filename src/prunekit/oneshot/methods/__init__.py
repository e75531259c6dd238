"""One-shot methods, registered by name in :data:`METHODS` (``METHODS.get("sparsegpt")``)."""
from prunekit.oneshot.methods.base import METHODS, MethodOptions, OneShotMethod, pattern_kind, register_method
from prunekit.oneshot.methods import magnitude, retrain_free, sparsegpt, wanda  # noqa: F401  (registers)
from prunekit.oneshot.methods.dsnot import dsnot_refine

__all__ = ["dsnot_refine", "METHODS", "MethodOptions", "OneShotMethod", "pattern_kind", "register_method"]
