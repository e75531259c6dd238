"""``retrain_free`` in the method registry, so one-shot configs can name it and check its pattern.

It is not a per-layer method: its Fisher scores need the loss gradients of the whole model, so it runs through
:func:`prunekit.oneshot.retrain_free.retrain_free_prune` (``whole_model = True`` tells callers so).
"""
from __future__ import annotations

import torch

from prunekit.errors import ConfigError
from prunekit.oneshot.methods.base import MethodOptions, OneShotMethod, register_method
from prunekit.oneshot.stats import InputStats
from prunekit.patterns.base import Pattern
from prunekit.patterns.blocks import BlockPattern


@register_method
class RetrainFree(OneShotMethod):
    """Kwon et al. 2022: channel masks from Fisher scores of calibration gradients (whole model)."""

    name = "retrain_free"
    patterns = ("channelxM", "Nxchannel")
    whole_model = True

    def check_pattern(self, pattern: Pattern) -> None:
        if not (isinstance(pattern, BlockPattern) and pattern.is_channel):
            raise ConfigError("pattern", pattern.spec, "allowed for method 'retrain_free': a channel pattern, "
                              "channelxM (input channels, e.g. channelx1) or Nxchannel (output channels)")

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("retrain_free prunes the whole model from its gradients: call "
                        "prunekit.oneshot.retrain_free.retrain_free_prune(model, dataloader, config)")
