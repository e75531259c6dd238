"""Finding a decoder LLM's parts by structure, not by class name.

The original took "the first ``ModuleList``" as the transformer blocks, which picks an expert list or a
vision tower as readily as the decoder. Here the decoder stack is the ``ModuleList`` holding the most
parameters whose children are all of one class and each contain prunable linears; the linears of a block are
``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whatever their names.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.errors import SelectionError
from prunekit.layouts import layout_of


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for modules whose weight layout prunekit knows as a 2-D linear (HF Conv1D)."""
    layout = layout_of(module)
    return layout is not None and getattr(module, "weight").dim() == 2


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linears inside one decoder block, by their name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


@dataclass
class DecoderStructure:
    """Where a causal LM keeps its decoder blocks: ``model.get_submodule(path)`` is ``layers``."""

    path: str
    layers: nn.ModuleList

    def layer_name(self, index: int) -> str:
        """Qualified name of block ``index`` (``model.layers.3``)."""
        return f"{self.path}.{index}" if self.path else str(index)

    def __len__(self) -> int:
        return len(self.layers)


def _param_count(module: nn.Module) -> int:
    # meta tensors count too: a model skeleton on the meta device is searched the same way
    return sum(p.numel() for p in module.parameters())


def find_decoder(model: nn.Module) -> DecoderStructure:
    """The decoder stack of ``model``; :class:`SelectionError` if it has none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not all(block_linears(child) for child in module):
            continue
        size = _param_count(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise SelectionError(
            f"model: got a {type(model).__name__} without decoder layers; allowed: a causal LM whose blocks sit "
            "in an nn.ModuleList of identical modules containing Linear/Conv1D layers (Llama, Qwen2, Mistral, "
            "GPT-2, OPT, ...)")
    return DecoderStructure(path=best[1], layers=best[2])
