"""The original's auto-slim names and call shapes (``neural_compressor.compression.pruner``).

Differences, on purpose: ``**kwargs`` cannot replace the generated ``pattern`` / ``op_names``; ``model_slim``
raises instead of logging a warning, and rounds deterministically (highest-scoring channels kept).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from torch import nn

from prunekit.slimming.auto_config import auto_slim_configs
from prunekit.slimming.slim import slim

logger = logging.getLogger(__name__)


def parse_auto_slim_config(model: nn.Module, dataloader: Iterable | None = None, ffn2_sparsity: float = 0.0,
                           mha_sparsity: float = 0.0, **kwargs: Any) -> list[dict[str, Any]]:
    """Same argument order as the original; see :func:`prunekit.slimming.auto_slim_configs`."""
    return auto_slim_configs(model, ffn2_sparsity, mha_sparsity, dataloader=dataloader, **kwargs)


def model_slim(model: nn.Module, dataloader: Iterable | None = None, round_multiplier: int = 32) -> nn.Module:
    """Slim FFNs and attention heads in place and return the model (errors are raised, not swallowed).

    ``round_multiplier`` keeps every FFN width a multiple of it; the report is logged at INFO level.
    """
    report = slim(model, round_to=round_multiplier, dataloader=dataloader)
    logger.info("%s", report.table())
    return model
