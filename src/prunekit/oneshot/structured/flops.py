"""Parameter and FLOP counts of a decoder stack: what a structured cut should buy in speed, ideally.

FLOPs of one forward over ``T`` tokens: ``2 T`` per weight of every linear inside the blocks, plus the attention
scores, ``4 T² · heads · head_dim`` per block (``q kᵀ`` and ``p v``, counted on the full square as the kernels
compute it). Norms, activations, rotary embeddings and softmax are left out: they are what keeps a measured
speed-up below this ideal.
"""
from __future__ import annotations

from torch import nn

from prunekit.oneshot.structure import DecoderStructure, block_linears
from prunekit.oneshot.structured.importance import LayerGroups
from prunekit.slimming.layers import layer_ops


def decoder_params(structure: DecoderStructure) -> int:
    """Parameters inside the decoder blocks (embeddings, final norm and LM head excluded)."""
    return sum(p.numel() for p in structure.layers.parameters())


def decoder_flops(model: nn.Module, structure: DecoderStructure, layers: list[LayerGroups], tokens: int) -> int:
    """FLOPs of the decoder stack on one sequence of ``tokens`` tokens (see the module docstring)."""
    total = 0
    for block, groups in zip(structure.layers, layers):
        total += 2 * tokens * sum(m.weight.numel() for m in block_linears(block).values())
        if groups.attention is not None:
            o = model.get_submodule(groups.attention.o)
            total += 4 * tokens * tokens * layer_ops(o).in_features(o)
    return total
