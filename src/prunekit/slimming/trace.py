"""Autograd-graph capture: one dummy forward, then a walk over ``grad_fn`` nodes (as Torch-Pruning does).

Forward hooks on every cuttable layer record which autograd node produced the layer's output and which node
produced its input. The graph itself (children of every node, the model outputs) is collected by walking
``next_functions`` back from the outputs. Rules in :mod:`prunekit.slimming.rules` read this graph; nothing here
knows about FFNs or attention.
"""
from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from prunekit.errors import SlimmingError
from prunekit.slimming.inputs import call_model, detach_inputs
from prunekit.slimming.layers import is_layer

Node = Any  # torch.autograd.graph.Node (C++ backed; hashable, identity-stable while alive)
Edge = tuple[Node, int]  # (node, which output of the node)


def kind(node: Node) -> str:
    """``MulBackward0`` -> ``Mul``; ``AccumulateGrad`` stays."""
    return re.sub(r"Backward\d*$", "", type(node).__name__)


@dataclass
class LayerCall:
    """One forward call of a layer: the autograd edges of its input and output."""

    name: str
    input: Edge | None
    output: Node | None


@dataclass
class TracedGraph:
    calls: dict[str, list[LayerCall]]
    owner: dict[Node, str]                      # layer output node -> layer name (every call)
    children: dict[Node, list[Node]]
    roots: set[Node]
    params: dict[Node, str]                     # AccumulateGrad node -> parameter name
    _keepalive: list[Any] = field(default_factory=list, repr=False)

    def call(self, name: str) -> LayerCall | None:
        """The single call of ``name``, or None when it ran zero or several times (shared modules)."""
        calls = self.calls.get(name, [])
        return calls[0] if len(calls) == 1 else None

    def describe(self, node: Node) -> str:
        """A short human name for a node, for error messages."""
        if node in self.params:
            return f"parameter {self.params[node]}"
        if node in self.owner:
            return f"output of {self.owner[node]}"
        return kind(node)


@contextlib.contextmanager
def _tracing_mode(model: nn.Module) -> Iterator[None]:
    """eval() (no dropout nodes), grad on, every floating parameter requiring grad; all restored afterwards."""
    training = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, flag in training:
            m.training = flag


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _all_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) or hasattr(obj, "values") and hasattr(obj, "keys"):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _all_tensors(item)


def trace(model: nn.Module, example_inputs: Any) -> TracedGraph:
    """Run ``model`` once on ``example_inputs`` and return its autograd graph with layer calls marked."""
    calls: dict[str, list[LayerCall]] = defaultdict(list)
    keep: list[Any] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            inp, out = _first_tensor(args), _first_tensor(output)
            edge = (inp.grad_fn, inp.output_nr) if inp is not None and inp.grad_fn is not None else None
            calls[name].append(LayerCall(name, edge, out.grad_fn if out is not None else None))
            keep.append(out)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if is_layer(m)]
    try:
        with _tracing_mode(model):
            outputs = call_model(model, detach_inputs(example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means "fall back to structure rules"
        raise SlimmingError(f"tracing the model failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()

    out_tensors = [t for t in _all_tensors(outputs) if t.grad_fn is not None]
    if not out_tensors:
        raise SlimmingError("tracing the model produced no output with an autograd graph")
    roots = {t.grad_fn for t in out_tensors}
    param_ids = {id(p): n for n, p in model.named_parameters()}
    children: dict[Node, list[Node]] = defaultdict(list)
    params: dict[Node, str] = {}
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in param_ids:
            params[node] = param_ids[id(variable)]
        for nxt, _ in node.next_functions:
            if nxt is not None:
                children[nxt].append(node)
                stack.append(nxt)
    owner = {c.output: n for n, cs in calls.items() for c in cs if c.output is not None}
    return TracedGraph(dict(calls), owner, dict(children), roots, params, _keepalive=[out_tensors, keep])
