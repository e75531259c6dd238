"""Which modules a pruner owns.

``op_names`` and ``excluded_op_names`` are regexes matched with ``re.search`` anywhere in the module name, as the
original matched them (so ``.*output`` selects ``encoder.layer.0.output.dense``; users' configs depend on it).
``pruning_op_types`` entries match a class name, or the start of one, anywhere in the module's MRO
(``"Conv"`` → Conv1d/2d/3d, ConvTranspose*, transformers' Conv1D; ``"Linear"`` → Linear and its subclasses);
the module must also have a known weight layout, so axis semantics are always right. The model's output head
is left alone unless an ``op_names`` entry names it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from prunekit.errors import SelectionError
from prunekit.layouts import WeightLayout, layout_of

_SKIP_AT_END = ("Dropout", "Identity", "Flatten", "Softmax", "LogSoftmax", "Tanh", "Sigmoid", "ReLU", "GELU")


@dataclass(frozen=True)
class Candidate:
    """A module that can be pruned, with its weight layout."""

    name: str
    module: nn.Module
    layout: WeightLayout


def _type_matches(module: nn.Module, op_types: Sequence[str]) -> bool:
    names = [cls.__name__ for cls in type(module).__mro__]
    return any(n.startswith(t) or n.lstrip("_").startswith(t) for t in op_types for n in names)


def output_heads(model: nn.Module) -> set[str]:
    """Names of the model's output head(s): the output embedding of HF models and the last weighted layer."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            heads.update(n for n, m in model.named_modules() if m is head)
    last = None
    for name, module in model.named_modules():
        if any(type(module).__name__.startswith(s) for s in _SKIP_AT_END) or not name:
            continue
        if list(module.children()):
            continue
        last = name if layout_of(module) is not None else None
    if last is not None:
        heads.add(last)
    return heads


def names_head(op_names: Sequence[str], head: str) -> bool:
    """An op_names entry names the head when, without anchors, it equals its full name or last component."""
    short = head.rsplit(".", 1)[-1]
    return any(p.strip("^$") in (head, short) for p in op_names)


def candidates(model: nn.Module, op_types: Sequence[str]) -> list[Candidate]:
    """Every module whose type matches ``op_types`` and whose weight layout prunekit knows."""
    out = []
    for name, module in model.named_modules():
        if not name or not _type_matches(module, op_types):
            continue
        layout = layout_of(module)
        if layout is not None:
            out.append(Candidate(name, module, layout))
    return out


def select(model: nn.Module, op_names: Sequence[str], excluded_op_names: Sequence[str],
           op_types: Sequence[str]) -> list[Candidate]:
    """Apply the selection rules; an empty result is a SelectionError that lists what could be selected."""
    pool = candidates(model, op_types)
    heads = output_heads(model)
    include = [re.compile(p) for p in op_names] or [re.compile("")]
    exclude = [re.compile(p) for p in excluded_op_names]
    chosen = []
    for cand in pool:
        if not any(r.search(cand.name) for r in include):
            continue
        if any(r.search(cand.name) for r in exclude):
            continue
        if cand.name in heads and not names_head(op_names, cand.name):
            continue
        chosen.append(cand)
    if not chosen:
        listing = ", ".join(c.name for c in pool[:30]) + (" …" if len(pool) > 30 else "")
        raise SelectionError(
            f"op_names={list(op_names)!r}, excluded_op_names={list(excluded_op_names)!r}, "
            f"pruning_op_types={list(op_types)!r} select no module. "
            f"Modules of those types: {listing or 'none'}"
            + (f" (the output head {sorted(heads)} is only pruned when op_names names it)" if heads else ""))
    return chosen
