"""Dependency groups: every coupled cut as one unit.

An :class:`FFNGroup` couples the output features of the first linear(s) of a feed-forward block with the input
features of its second linear. An :class:`AttentionGroup` couples, per head, rows of the q/k/v projections with
columns of the output projection; it describes exactly which features belong to which head, for separate and
fused (GPT-2 ``c_attn``) projections and for grouped-query attention, so that a head-mask pattern can be built on
it without knowing the model family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunekit.errors import SlimmingError
from prunekit.slimming.layers import layer_ops

Axis = Literal["out", "in"]


@dataclass(frozen=True)
class WeightSlice:
    """Features ``start:stop`` along the ``out`` or ``in`` axis of ``module`` (a layer's logical axes)."""

    module: str
    axis: Axis
    start: int
    stop: int

    def weight_index(self, model: nn.Module) -> tuple[slice, ...]:
        """Index into ``module.weight`` selecting this slice, whatever the layer's storage layout."""
        mod = model.get_submodule(self.module)
        ops = layer_ops(mod)
        if ops is None:
            raise SlimmingError(f"{self.module}: {type(mod).__name__} is not a layer slimming can cut")
        dim = ops.out_dim if self.axis == "out" else ops.in_dim
        index = [slice(None)] * mod.weight.dim()
        index[dim] = slice(self.start, self.stop)
        return tuple(index)

    def bias_index(self) -> slice | None:
        """Index into ``module.bias`` (only output slices own bias entries)."""
        return slice(self.start, self.stop) if self.axis == "out" else None


@dataclass
class FFNGroup:
    """A feed-forward block: ``consumer`` reads the ``width`` features written by every producer.

    ``name`` is the innermost module containing all members; ``source`` says how the group was found
    (``"trace"``: autograd dataflow, ``"structure"``: module-name rules after tracing failed).
    """

    name: str
    producers: list[str]
    consumer: str
    width: int
    source: str = "trace"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FFNGroup":
        return cls(**data)


@dataclass
class AttentionGroup:
    """One attention block.

    Head ``h`` (``0 <= h < num_heads``) owns output features ``q_offset + h*head_dim ... + head_dim`` of ``q``
    and input features ``h*head_dim ... + head_dim`` of ``o``. Key/value head ``g`` (``0 <= g < num_kv_heads``)
    owns output features ``k_offset + g*head_dim ...`` of ``k`` and ``v_offset + g*head_dim ...`` of ``v``;
    query head ``h`` reads key/value head ``h // heads_per_kv`` (grouped-query attention; plain multi-head
    attention is ``num_kv_heads == num_heads``). With ``fused_qkv`` the three projections are one module
    (``q == k == v``) and the offsets place q, k and v inside its output.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    fused_qkv: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_offset: int = 0
    k_offset: int = 0
    v_offset: int = 0
    source: str = "trace"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise SlimmingError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # --- head arithmetic -------------------------------------------------------------------------------------
    @property
    def heads_per_kv(self) -> int:
        """Query heads reading each key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @property
    def modules(self) -> list[str]:
        """The distinct layer names of the block (q, k, v, o; one entry for a fused qkv)."""
        return list(dict.fromkeys([self.q, self.k, self.v, self.o]))

    def kv_head_of(self, head: int) -> int:
        return head // self.heads_per_kv

    def query_heads_of(self, kv_head: int) -> list[int]:
        r = self.heads_per_kv
        return list(range(kv_head * r, (kv_head + 1) * r))

    def _span(self, offset: int, index: int) -> tuple[int, int]:
        start = offset + index * self.head_dim
        return start, start + self.head_dim

    def query_head_slices(self, head: int) -> list[WeightSlice]:
        """What query head ``head`` owns alone: its q rows and its o columns."""
        return [WeightSlice(self.q, "out", *self._span(self.q_offset, head)),
                WeightSlice(self.o, "in", *self._span(0, head))]

    def kv_head_slices(self, kv_head: int) -> list[WeightSlice]:
        """What key/value head ``kv_head`` owns (shared by :meth:`query_heads_of`): its k and v rows."""
        return [WeightSlice(self.k, "out", *self._span(self.k_offset, kv_head)),
                WeightSlice(self.v, "out", *self._span(self.v_offset, kv_head))]

    def head_slices(self, head: int) -> list[WeightSlice]:
        """Everything removed with head ``head``: q/o always, k/v too when no other query head shares them."""
        slices = self.query_head_slices(head)
        if self.heads_per_kv == 1:
            slices += self.kv_head_slices(head)
        return slices

    def feature_index(self, role: Literal["q", "k", "v", "o"], heads: list[int]) -> torch.Tensor:
        """Feature indices of ``role``'s module owned by ``heads`` (kv heads for k/v), in head order."""
        offset = {"q": self.q_offset, "k": self.k_offset, "v": self.v_offset, "o": 0}[role]
        parts = [torch.arange(*self._span(offset, h)) for h in heads]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionGroup":
        return cls(**data)


def common_prefix(names: list[str]) -> str:
    """The innermost module path containing every name (``""`` for the root)."""
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    # A member's own path is not its container: drop a full match of the shortest name.
    if parts and len(prefix) == min(len(p) for p in parts):
        prefix = prefix[:-1]
    return ".".join(prefix)


def resized(group: AttentionGroup, num_heads: int, num_kv_heads: int) -> AttentionGroup:
    """``group`` after slimming to ``num_heads`` / ``num_kv_heads`` heads.

    Roles sharing one layer (fused qkv, or k/v fused apart from q) keep their order inside it and close up.
    """
    data = group.to_dict()
    data.update(num_heads=num_heads, num_kv_heads=num_kv_heads)
    widths = {"q": num_heads * group.head_dim, "k": num_kv_heads * group.head_dim,
              "v": num_kv_heads * group.head_dim}
    for layer in {group.q, group.k, group.v}:
        roles = sorted((r for r in "qkv" if getattr(group, r) == layer), key=lambda r: getattr(group, f"{r}_offset"))
        offset = getattr(group, f"{roles[0]}_offset")
        for role in roles:
            data[f"{role}_offset"] = offset
            offset += widths[role]
    return AttentionGroup.from_dict(data)
