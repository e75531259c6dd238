"""One-shot methods, registered by name in :data:`METHODS` (``METHODS.get("sparsegpt")``)."""
from prunekit.oneshot.methods.base import METHODS, MethodOptions, OneShotMethod, pattern_kind, register_method
from prunekit.oneshot.methods import magnitude  # noqa: F401  (registers)

__all__ = ["METHODS", "MethodOptions", "OneShotMethod", "pattern_kind", "register_method"]
