"""Finding FFN and attention groups: autograd dataflow first, module-structure rules when tracing fails."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from prunekit.errors import SlimmingError
from prunekit.registry import Registry
from prunekit.slimming.groups import AttentionGroup, FFNGroup
from prunekit.slimming.inputs import resolve_inputs
from prunekit.slimming.rules import Rejection, find_in_graph
from prunekit.slimming.structure import find_by_structure
from prunekit.slimming.trace import trace

logger = logging.getLogger(__name__)


@dataclass
class Detection:
    """Everything detection learned about a model."""

    ffn: list[FFNGroup]
    attention: list[AttentionGroup]
    rejected: list[Rejection] = field(default_factory=list)
    method: str = "trace"
    trace_error: str | None = None  # why tracing failed when the structure rules were used instead


METHODS: Registry[Callable[[nn.Module, Any], Detection]] = Registry("method")


@METHODS.register("trace")
def _by_trace(model: nn.Module, example_inputs: Any) -> Detection:
    graph = trace(model, example_inputs)
    ffn, attention, rejected = find_in_graph(model, graph)
    return Detection(ffn, attention, rejected, method="trace")


@METHODS.register("structure")
def _by_structure(model: nn.Module, example_inputs: Any) -> Detection:
    ffn, attention = find_by_structure(model)
    return Detection(ffn, attention, method="structure")


@METHODS.register("auto")
def _auto(model: nn.Module, example_inputs: Any) -> Detection:
    try:
        return _by_trace(model, example_inputs)
    except SlimmingError as exc:
        logger.warning("prunekit.slimming: %s; falling back to module-structure rules", exc)
        found = _by_structure(model, example_inputs)
        found.trace_error = str(exc)
        return found


def detect(model: nn.Module, example_inputs: Any = None, *, method: str = "auto",
           dataloader: Iterable | None = None) -> Detection:
    """Find every FFN and attention group of ``model``.

    ``example_inputs`` (tensor, tuple or dict) drive one traced forward; without them the first ``dataloader``
    batch is used, else a dummy input built from the model's config. ``method`` is ``"auto"`` (trace, fall back
    to structure rules if tracing raises), ``"trace"`` or ``"structure"``.
    """
    fn = METHODS.get(method)
    inputs = resolve_inputs(model, example_inputs, dataloader) if method != "structure" else None
    return fn(model, inputs)


def find_ffn_groups(model: nn.Module, example_inputs: Any = None, *, method: str = "auto") -> list[FFNGroup]:
    """Feed-forward groups (second linear ← first linear(s)) of ``model``, in module order."""
    return detect(model, example_inputs, method=method).ffn


def find_attention_groups(model: nn.Module, example_inputs: Any = None, *,
                          method: str = "auto") -> list[AttentionGroup]:
    """Attention groups (q/k/v/o, heads, key/value heads, head_dim) of ``model``, in module order."""
    return detect(model, example_inputs, method=method).attention
