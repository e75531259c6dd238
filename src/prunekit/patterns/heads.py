"""The ``mha`` pattern: whole attention heads.

A unit is one key/value group: with plain multi-head attention that is one head (its q, k, v rows and its
output-projection columns); with grouped-query attention it is a key/value head together with every query head
reading it, so whatever is pruned stays a legal GQA shape (each kv head keeps the same number of query heads).
Attention blocks are found by :mod:`prunekit.slimming`'s dataflow detection, which also describes fused qkv
projections (GPT-2 ``c_attn``). A :class:`HeadLayer` is both the pruned "layer" of a block and its own bound
pattern; every block keeps at least one unit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from prunekit.layouts import WeightLayout, layout_of
from prunekit.patterns.base import Pattern

HEAD_MASK = "head_prune_mask"


class HeadPattern(Pattern):
    """Attention heads. Binds to attention groups, not to single weights."""

    def __init__(self, spec: str = "mha") -> None:
        self.spec = spec

    def bind(self, shape: Sequence[int], layout: WeightLayout, reduce: str = "mean") -> str:
        return "the mha pattern prunes attention heads; it binds to attention blocks, not to one weight"


class _Role:
    """One of q/k/v/o: a module, the axis its head features live on, and the features of every unit."""

    def __init__(self, module: nn.Module, axis: int, features: torch.Tensor) -> None:
        self.module, self.axis, self.features = module, axis, features  # features: [units, per_unit]

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def owns_bias(self) -> bool:  # output features carry bias entries; input features do not
        return self.axis == layout_of(self.module).out_axis and getattr(self.module, "bias", None) is not None


class HeadLayer:
    """The heads of one attention block, with the engine's layer interface (and its own bound pattern)."""

    needs_scores_for_mask = False
    elementwise_mask = False
    min_keep_units = 1  # an attention block never loses its last head during training
    score_scale = 1.0  # head scores are stored as they are ranked
    tiles = None  # scores span several weights: no fused per-weight kernel
    buffer = HEAD_MASK

    def __init__(self, model: nn.Module, group, reduce: str = "mean") -> None:
        self.group, self.name, self.reduce = group, group.name, reduce
        self.container = model.get_submodule(group.name) if group.name else model
        units = group.num_kv_heads
        roles = []
        for role, module_name in (("q", group.q), ("k", group.k), ("v", group.v), ("o", group.o)):
            module = model.get_submodule(module_name)
            layout = layout_of(module)
            axis = layout.in_axis if role == "o" else layout.out_axis
            per_unit = [group.query_heads_of(g) if role in "qo" else [g] for g in range(units)]
            features = torch.stack([group.feature_index(role, heads) for heads in per_unit])
            roles.append(_Role(module, axis, features.to(module.weight.device)))
        self.roles = roles
        self.modules = list({id(r.module): r.module for r in roles}.values())
        self.num_units = units
        self.score_shape = (units,)
        self.mask_shape = (units,)
        self.numel = sum(m.weight.numel() for m in self.modules)
        self.unit_zeros = sum(r.features.shape[1] * r.weight.numel() // r.weight.shape[r.axis] for r in roles)
        self.bound = self
        self.packed = False
        if not isinstance(getattr(self.container, HEAD_MASK, None), torch.Tensor):
            self.container.register_buffer(HEAD_MASK, torch.ones(units, dtype=torch.bool,
                                                                 device=self.device), persistent=False)
        self._feature_keep: list[torch.Tensor] | None = None

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.roles[0].weight.device

    @property
    def weight(self) -> nn.Parameter:  # the engine only asks for a device-bearing tensor
        return self.roles[0].weight

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.container, HEAD_MASK)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.reshape(self.mask_shape))
        self._feature_keep = None

    def full_mask(self) -> torch.Tensor:
        return torch.ones(self.mask_shape, dtype=torch.bool)

    def pruned_units(self, mask: torch.Tensor) -> int:
        return mask.numel() - int(mask.count_nonzero())

    def zeros(self) -> int:
        return self.pruned_units(self.mask) * self.unit_zeros

    def element_sparsity(self, mask: torch.Tensor) -> float:
        return self.pruned_units(mask) * self.unit_zeros / self.numel

    # --- scoring ---------------------------------------------------------------------------------------------
    def reduced_scores(self, term: Callable, buffer: Callable, needs_grad: bool) -> torch.Tensor | None:
        """Per unit: the mean over q, k, v and o of that role's reduced |term| (the original's head score)."""
        per_module = {}
        for module in self.modules:
            grad = module.weight.grad
            if needs_grad and grad is None:
                return None
            weight = module.weight.detach()
            # each module's term is consumed before the next is computed, so a shared buffer is safe
            per_module[id(module)] = term(weight, grad, buffer(weight)).abs_()
            per_module[id(module)] = self._role_scores(module, per_module[id(module)])
        parts = [per_module[id(r.module)][i] for i, r in enumerate(self.roles) if id(r.module) in per_module]
        stacked = torch.stack(parts)
        return stacked.amax(dim=0) if self.reduce == "max" else (
            stacked.sum(dim=0) if self.reduce == "sum" else stacked.mean(dim=0))

    def _role_scores(self, module: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for role in self.roles:
            if role.module is not module:
                out.append(None)
                continue
            picked = x.index_select(role.axis, role.features.reshape(-1)).movedim(role.axis, 0)
            picked = picked.reshape(self.num_units, -1)
            out.append(picked.amax(dim=1) if self.reduce == "max" else (
                picked.sum(dim=1) if self.reduce == "sum" else picked.mean(dim=1)))
        return out

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.reshape(-1)

    def reduce_abs(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - heads score via reduced_scores
        raise NotImplementedError

    def mask_from_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        return ~pruned.reshape(self.mask_shape)

    def set_pruned_units(self, pruned: torch.Tensor, scores: torch.Tensor | None, count: int | None = None) -> None:
        self.set_mask(self.mask_from_pruned_units(pruned.to(self.device), scores))  # head masks are tiny

    @torch.no_grad()
    def lock_existing_zeros(self) -> None:
        """A unit whose output-projection columns and q rows are all zero stays pruned."""
        keep = torch.zeros(self.num_units, dtype=torch.bool, device=self.device)
        for role in self.roles:
            if role is self.roles[0] or role is self.roles[3]:
                picked = role.weight.index_select(role.axis, role.features.reshape(-1)).movedim(role.axis, 0)
                keep |= picked.reshape(self.num_units, -1).ne(0).any(dim=1)
        self.set_mask(keep)

    # --- masking ---------------------------------------------------------------------------------------------
    def _keeps(self) -> list[torch.Tensor]:
        """Per role, a bool over that module's head axis (cached until the mask changes)."""
        if self._feature_keep is None:
            pruned = (~self.mask).nonzero().flatten()
            keeps = []
            for role in self.roles:
                keep = torch.ones(role.weight.shape[role.axis], dtype=torch.bool, device=self.device)
                keep[role.features[pruned].reshape(-1)] = False
                keeps.append(keep)
            self._feature_keep = keeps
        return self._feature_keep

    def _apply_to(self, pick: Callable[[_Role], tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
        for role, keep in zip(self.roles, self._keeps()):
            weight, bias = pick(role)
            if weight is not None:
                shape = [1] * weight.dim()
                shape[role.axis] = -1
                weight.mul_(keep.view(shape))
            if bias is not None and role.owns_bias():
                bias.mul_(keep)

    @torch.no_grad()
    def apply_(self) -> None:
        self._apply_to(lambda r: (r.weight.data, r.module.bias.data if r.owns_bias() else None))

    @torch.no_grad()
    def mask_grad_(self) -> None:
        self._apply_to(lambda r: (r.weight.grad, r.module.bias.grad if r.owns_bias() else None))

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        for role, keep in zip(self.roles, self._keeps()):
            params = [(role.weight, role.axis)] + ([(role.module.bias, 0)] if role.owns_bias() else [])
            for param, axis in params:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        shape = [1] * value.dim()
                        shape[axis] = -1
                        value.mul_(keep.view(shape))

    @property
    def holder(self) -> nn.Module:
        """The module that carries the head mask buffer."""
        return self.container

    def detach(self) -> None:
        from prunekit.masks import set_owner

        self.container._buffers.pop(HEAD_MASK, None)
        self.container.__dict__.get("_prunekit_schedule", {}).pop(HEAD_MASK, None)
        set_owner(self.container, None)


def head_layers(model: nn.Module, op_names: Sequence[str], excluded_op_names: Sequence[str],
                reduce: str, claim: Callable[[nn.Module], None] | None = None) -> list[HeadLayer]:
    """A HeadLayer per detected attention block whose name (or a member's) matches the selection regexes;
    ``claim`` is called on each chosen block's modules before its mask is attached."""
    import re

    from prunekit.errors import SelectionError
    from prunekit.slimming import find_attention_groups

    groups = find_attention_groups(model)
    include = [re.compile(p) for p in op_names] or [re.compile("")]
    exclude = [re.compile(p) for p in excluded_op_names]

    def names(g) -> list[str]:
        return [g.name, g.q, g.k, g.v, g.o]

    chosen = [g for g in groups
              if any(r.search(n) for r in include for n in names(g))
              and not any(r.search(g.name) for r in exclude)]
    if not chosen:
        found = ", ".join(g.name for g in groups) or "none"
        raise SelectionError(f"pattern 'mha': op_names={list(op_names)!r}, excluded_op_names="
                             f"{list(excluded_op_names)!r} select no attention block; detected blocks: {found}")
    if claim is not None:
        for g in chosen:
            for name in dict.fromkeys(names(g)):
                claim(model.get_submodule(name) if name else model)
    return [HeadLayer(model, g, reduce) for g in chosen]
