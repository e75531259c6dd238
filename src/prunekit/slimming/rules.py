"""Dataflow rules that turn a :class:`~prunekit.slimming.trace.TracedGraph` into dependency groups.

FFN rule: walking back from a layer's input through element-wise ops only (activations, mul/add/…, dropout)
must reach nothing but other layers' outputs (the producers) and constants; and every intermediate value must be
consumed only inside the group, so that cutting a channel touches nothing else.

Attention rule: walking back from a layer's input through layout ops (view/transpose/…) reaches an attention
core (``scaled_dot_product_attention`` or the eager ``softmax(q @ kᵀ) @ v``); from the core's q, k and v
inputs, layout and rotary ops lead to exactly one layer each, possibly through a ``split`` of a fused projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.slimming.groups import AttentionGroup, FFNGroup, common_prefix
from prunekit.slimming.layers import layer_ops
from prunekit.slimming.trace import Edge, Node, TracedGraph, kind

# Ops that act on every feature independently: a channel in is the same channel out. Operands without grad
# (scalars, token masks) are taken as broadcast; a per-channel constant would fail loudly after slimming.
ELEMENTWISE = frozenset({
    "Gelu", "Silu", "Relu", "Tanh", "Sigmoid", "Mul", "Div", "Add", "Sub", "Pow", "Neg", "Erf", "Exp", "Sqrt",
    "Rsqrt", "Abs", "Clamp", "Hardtanh", "LeakyRelu", "Elu", "Softplus", "Mish", "Hardswish", "Hardsigmoid",
    "NativeDropout", "Clone", "ToCopy",
})
# Ops that move data between (batch, seq, head, head_dim) axes without mixing heads.
LAYOUT = frozenset({
    "View", "UnsafeView", "ReshapeAlias", "Transpose", "Permute", "Clone", "Expand", "Unsqueeze", "Squeeze",
    "NativeDropout", "ToCopy",
})
# Between a projection and the attention core: layout plus rotary embedding (x*cos + rotate_half(x)*sin),
# scaling, and the split of a fused projection.
QKV_PATH = LAYOUT | {"Mul", "Div", "Add", "Sub", "Neg", "Cat", "Slice", "Split", "SplitWithSizes"}
# Between q @ kᵀ and the probabilities: scaling, additive masks, softmax, dropout.
PROBS_PATH = LAYOUT | {"Softmax", "Add", "Mul", "Div", "Sub", "Masked_fill", "MaskedFill", "Where"}
SPLITS = frozenset({"Split", "SplitWithSizes"})


@dataclass
class Rejection:
    """A layer that looked like a group member but could not be grouped, and why."""

    layer: str
    kind: str  # "ffn" | "attention" | "layer"
    reason: str


def _layer_width(model: nn.Module, name: str, axis: str) -> int:
    module = model.get_submodule(name)
    ops = layer_ops(module)
    return ops.out_features(module) if axis == "out" else ops.in_features(module)


# --------------------------------------------------------------------------------------------------------------
# FFN
# --------------------------------------------------------------------------------------------------------------
def _internal_nodes(graph: TracedGraph, output: Node, stop: Node, limit: int = 64) -> set[Node] | None:
    """Nodes created inside one layer call: back from its output node down to its input node."""
    inside: set[Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node is stop or node in inside or node in graph.params:
            continue
        inside.add(node)
        if len(inside) > limit:
            return None
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return inside


def ffn_group(model: nn.Module, graph: TracedGraph, consumer: str) -> FFNGroup | Rejection | None:
    """The FFN group whose second layer is ``consumer``; None when ``consumer`` reads no other layer."""
    call = graph.call(consumer)
    if call is None or call.input is None:
        return None
    start = call.input[0]
    inside: set[Node] = set()
    producers: list[str] = []
    blockers: list[str] = []
    stack = [start]
    while stack:
        node = stack.pop()
        if node in inside:
            continue
        if node in graph.owner:
            if graph.owner[node] not in producers:
                producers.append(graph.owner[node])
            continue
        if kind(node) not in ELEMENTWISE:
            blockers.append(graph.describe(node))
            continue
        inside.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    if not producers:
        return None
    reject = lambda why: Rejection(consumer, "ffn", why)  # noqa: E731
    if blockers:
        return reject(f"its input also depends on {', '.join(sorted(set(blockers)))}, not only on "
                      f"{', '.join(producers)} through element-wise ops")
    width = _layer_width(model, consumer, "in")
    model_width = {_layer_width(model, p, "in") for p in producers}
    if model_width != {_layer_width(model, consumer, "out")}:
        # An FFN block maps the model width back to itself; pooler -> classifier heads do not.
        return reject(f"maps {sorted(model_width)} -> {_layer_width(model, consumer, 'out')} features: "
                      "a head, not an FFN block")
    for p in producers:
        if graph.call(p) is None:
            return reject(f"producer {p} runs {len(graph.calls.get(p, []))} times per forward (shared)")
        if _layer_width(model, p, "out") != width:
            return reject(f"producer {p} writes {_layer_width(model, p, 'out')} features, {consumer} reads {width}")
    internal = _internal_nodes(graph, call.output, start) if call.output is not None else None
    if internal is None:
        return reject("cannot delimit the layer's own autograd nodes")
    group_nodes = inside | {graph.call(p).output for p in producers}
    allowed = group_nodes | internal
    for node in group_nodes:
        if node in graph.roots:
            return reject(f"an intermediate value ({graph.describe(node)}) is a model output")
        outside = [c for c in graph.children.get(node, []) if c not in allowed]
        if outside:
            return reject(f"{graph.describe(node)} is also read outside the block (by {kind(outside[0])})")
    order = list(graph.calls)  # execution order: deterministic, and the order a reader expects
    producers.sort(key=order.index)
    name = common_prefix(producers + [consumer])
    return FFNGroup(name=name, producers=producers, consumer=consumer, width=width)


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    layer: str
    offset: int          # first output feature of the layer feeding this role
    width: int           # number of output features feeding this role


def _follow_layout(node: Node | None, allowed: frozenset[str]) -> Node | None:
    """Follow single-input ops in ``allowed``; return the first node that is not one of them."""
    while node is not None and kind(node) in allowed:
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return node
        node = inputs[0]
    return node


def _split_range(node: Node, output_nr: int) -> tuple[int, int] | None:
    """(offset, width) of output ``output_nr`` of a split along the last dimension, else None."""
    sizes = list(getattr(node, "_saved_self_sym_sizes", ()))
    dim = getattr(node, "_saved_dim", None)
    if dim is not None and dim >= 2**63:  # autograd saves a negative dim as an unsigned 64-bit integer
        dim -= 2**64
    if not sizes or dim is None or dim not in (-1, len(sizes) - 1):
        return None
    total = int(sizes[-1])
    if kind(node) == "SplitWithSizes":
        widths = [int(s) for s in node._saved_split_sizes]
    else:
        size = int(node._saved_split_size)
        widths = [min(size, total - i) for i in range(0, total, size)]
    return sum(widths[:output_nr]), widths[output_nr]


def _source(model: nn.Module, graph: TracedGraph, edge: Edge) -> _Source | str:
    """The single layer feeding one attention input (q, k or v), or a reason string."""
    found: dict[tuple[str, int, int], None] = {}
    blockers: list[str] = []
    seen: set[tuple[Node, int]] = set()
    stack: list[tuple[Node, int, tuple[int, int] | None]] = [(edge[0], edge[1], None)]
    while stack:
        node, output_nr, split = stack.pop()
        if (node, output_nr) in seen:
            continue
        seen.add((node, output_nr))
        if node in graph.owner:
            layer = graph.owner[node]
            width = _layer_width(model, layer, "out")
            offset, w = split if split is not None else (0, width)
            found[(layer, offset, w)] = None
            continue
        k = kind(node)
        if k not in QKV_PATH:
            blockers.append(graph.describe(node))
            continue
        if k in SPLITS:
            if split is not None:
                blockers.append("nested split")
                continue
            split = _split_range(node, output_nr)
            if split is None:
                blockers.append("split not along the feature dimension")
                continue
        stack.extend((n, nr, split) for n, nr in node.next_functions if n is not None)
    if blockers:
        return f"depends on {', '.join(sorted(set(blockers)))}"
    if len(found) != 1:
        return f"reads {len(found)} projections ({', '.join(sorted(l for l, _, _ in found))}), expected one"
    (layer, offset, width), = found
    if graph.call(layer) is None:
        return f"{layer} runs several times per forward (shared)"
    return _Source(layer, offset, width)


def _core(graph: TracedGraph, node: Node) -> tuple[Edge, Edge, Edge, int | None] | str:
    """(q, k, v) edges of an attention core and its head_dim (None when not recorded), or a reason."""
    k = kind(node)
    if "ScaledDotProduct" in k:
        q_edge, k_edge, v_edge = node.next_functions[:3]
        saved = getattr(node, "_saved_query", None)
        return q_edge, k_edge, v_edge, (int(saved.shape[-1]) if saved is not None else None)
    if k == "Bmm":
        probs, v_edge = node.next_functions[:2]
        stack, scores, seen = [probs[0]], [], set()
        while stack:
            cur = stack.pop()
            if cur is None or cur in seen:
                continue
            seen.add(cur)
            if kind(cur) == "Bmm":
                scores.append(cur)
            elif kind(cur) in PROBS_PATH:
                stack.extend(n for n, _ in cur.next_functions if n is not None)
        if len(scores) != 1:
            return "no single q @ kᵀ product before the softmax"
        q_edge, k_edge = scores[0].next_functions[:2]
        saved = getattr(scores[0], "_saved_self", None)
        return q_edge, k_edge, v_edge, (int(saved.shape[-1]) if saved is not None else None)
    return f"{k} is not an attention core"


def attention_group(model: nn.Module, graph: TracedGraph, out_proj: str) -> AttentionGroup | Rejection | None:
    """The attention block whose output projection is ``out_proj``; None when its input is no attention."""
    call = graph.call(out_proj)
    if call is None or call.input is None:
        return None
    core_node = _follow_layout(call.input[0], LAYOUT)
    if core_node is None:
        return None
    core = _core(graph, core_node)
    if isinstance(core, str):
        return None
    reject = lambda why: Rejection(out_proj, "attention", why)  # noqa: E731
    q_edge, k_edge, v_edge, head_dim = core
    sources: dict[str, _Source] = {}
    for role, edge in (("q", q_edge), ("k", k_edge), ("v", v_edge)):
        src = _source(model, graph, edge)
        if isinstance(src, str):
            return reject(f"attention {role} input {src}")
        sources[role] = src
    q, k, v = sources["q"], sources["k"], sources["v"]
    if head_dim is None or head_dim <= 0:
        return reject("head_dim could not be read from the attention core")
    if q.width % head_dim or k.width % head_dim or v.width != k.width:
        return reject(f"q/k/v widths {q.width}/{k.width}/{v.width} do not fit head_dim {head_dim}")
    num_heads, num_kv = q.width // head_dim, k.width // head_dim
    if num_kv == 0 or num_heads % num_kv:
        return reject(f"{num_heads} query heads cannot share {num_kv} key/value heads evenly")
    if _layer_width(model, out_proj, "in") != q.width:
        return reject(f"{out_proj} reads {_layer_width(model, out_proj, 'in')} features, q writes {q.width}")
    names = [q.layer, k.layer, v.layer, out_proj]
    return AttentionGroup(
        name=common_prefix(names), q=q.layer, k=k.layer, v=v.layer, o=out_proj,
        fused_qkv=q.layer == k.layer == v.layer, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
        q_offset=q.offset, k_offset=k.offset, v_offset=v.offset)


def find_in_graph(model: nn.Module, graph: TracedGraph) -> tuple[list[FFNGroup], list[AttentionGroup],
                                                                   list[Rejection]]:
    """Every FFN and attention group of a traced model, in module order, plus the rejected candidates."""
    ffn: list[FFNGroup] = []
    attn: list[AttentionGroup] = []
    rejected: list[Rejection] = []
    for name, module in model.named_modules():
        if layer_ops(module) is None:
            continue
        calls = len(graph.calls.get(name, []))
        if calls > 1:
            rejected.append(Rejection(name, "layer", f"runs {calls} times per forward (shared weights): "
                                                     "cutting it would change every use"))
            continue
        for rule, bucket in ((attention_group, attn), (ffn_group, ffn)):
            found: Any = rule(model, graph, name)
            if isinstance(found, Rejection):
                rejected.append(found)
            elif found is not None:
                bucket.append(found)
                break
    return ffn, attn, rejected
