"""Keeping ranks in agreement under torch.distributed.

Scores are computed from gradients that DDP has already averaged, so ranks compute the same masks; broadcasting
the masks from rank 0 after every event makes that a guarantee instead of an assumption (a bool per block is
cheap), whatever the floating-point order of each rank's kernels.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_masks(layers: Iterable[Any], src: int = 0) -> None:
    """Overwrite every rank's layer masks with rank ``src``'s (bool masks go over the wire as uint8)."""
    if not is_distributed():
        return
    for layer in layers:
        wire = layer.mask.to(torch.uint8)
        dist.broadcast(wire, src=src)
        layer.set_mask(wire.bool())
