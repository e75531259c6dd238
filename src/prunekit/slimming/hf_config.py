"""Writing slimmed shapes into a transformers config.

Scalar fields (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``) are updated when every
layer agrees; per-layer shapes always go into ``config.prunekit_slimming`` together with the original scalar
values, which is what :func:`prunekit.slimming.io.load_slimmed` rebuilds from. Families that honour an explicit
``config.head_dim`` also get it written, so a uniformly slimmed model of such a family loads with plain
``from_pretrained``; for the others (BERT, GPT-2, DistilBERT derive the head size as hidden / heads) use
``load_slimmed``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.slimming.groups import AttentionGroup, FFNGroup

ENTRY = "prunekit_slimming"
FORMAT = 1


@dataclass(frozen=True)
class ConfigFields:
    """Which config fields describe FFN width and head counts for one model family."""

    ffn_width: tuple[str, ...] = ("intermediate_size", "ffn_dim", "d_ff", "n_inner")
    heads: str = "num_attention_heads"        # transformers maps it to n_head / n_heads via attribute_map
    kv_heads: str | None = "num_key_value_heads"
    honours_head_dim: bool = False            # the model reads config.head_dim instead of hidden / heads


_HEAD_DIM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "vit", "deit")
CONFIG_FIELDS: dict[str, ConfigFields] = {
    "distilbert": ConfigFields(ffn_width=("hidden_dim",)),
    "gpt2": ConfigFields(ffn_width=("n_inner",)),
    **{family: ConfigFields(honours_head_dim=True) for family in _HEAD_DIM_FAMILIES},
}
DEFAULT_FIELDS = ConfigFields()


def fields_for(config: Any) -> ConfigFields:
    return CONFIG_FIELDS.get(getattr(config, "model_type", ""), DEFAULT_FIELDS)


def _ffn_field(config: Any, fields: ConfigFields) -> str | None:
    for name in fields.ffn_width:
        if hasattr(config, name):
            return name
    return None


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def read_record(model: nn.Module) -> dict[str, Any] | None:
    """The slimming record of ``model`` (from its config, else from the model itself), if it was slimmed."""
    config = getattr(model, "config", None)
    return getattr(config if config is not None else model, ENTRY, None)


def update_config(model: nn.Module, ffn: list[tuple[FFNGroup, FFNGroup]],
                  attention: list[tuple[AttentionGroup, AttentionGroup, list[int] | None]]) -> dict[str, Any]:
    """Record the shapes of every group in ``model.config`` (scalar fields where every layer agrees).

    ``ffn`` holds (before, after) pairs; ``attention`` holds (before, after, kept) where ``kept`` lists the
    indices, among the heads before this slim, of the heads kept (None: untouched). Slimming twice composes:
    the entry always refers to the model as it was before its first slim. A model without a config gets the
    entry as its own ``prunekit_slimming`` attribute. Returns the entry.
    """
    config = getattr(model, "config", None)
    holder = config if config is not None else model
    fields = fields_for(config)
    previous = read_record(model) or {}
    original = dict(previous.get("original", {}))
    ffn_field = _ffn_field(config, fields) if config is not None else None
    for name in (ffn_field, fields.heads, fields.kv_heads, "head_dim"):
        if config is not None and name and hasattr(config, name):
            original.setdefault(name, getattr(config, name))

    prior_ffn = {f["consumer"]: f for f in previous.get("ffn", [])}
    ffn_entries = []
    for before, after in ffn:
        entry = after.to_dict()
        entry["original_width"] = prior_ffn.get(after.consumer, {}).get("original_width", before.width)
        ffn_entries.append(entry)

    prior_attn = {a["name"]: a for a in previous.get("attention", [])}
    attention_entries = []
    for before, after, kept in attention:
        prior = prior_attn.get(after.name, {})
        entry = after.to_dict()
        entry.pop("extra", None)
        entry["original_num_heads"] = prior.get("original_num_heads", before.num_heads)
        entry["original_num_kv_heads"] = prior.get("original_num_kv_heads", before.num_kv_heads)
        base = prior.get("kept_heads", list(range(before.num_heads)))
        entry["kept_heads"] = [base[h] for h in kept] if kept is not None else base
        attention_entries.append(entry)

    record = {"format": FORMAT, "original": original, "ffn": ffn_entries, "attention": attention_entries}
    setattr(holder, ENTRY, record)
    if config is None:
        return record
    widths = {after.width for _, after in ffn}
    if ffn_field is not None and len(widths) == 1:
        setattr(config, ffn_field, widths.pop())
    shapes = {(a.num_heads, a.num_kv_heads, a.head_dim) for _, a, _ in attention}
    if len(shapes) == 1:
        num_heads, num_kv, head_dim = shapes.pop()
        setattr(config, fields.heads, num_heads)
        if fields.kv_heads and hasattr(config, fields.kv_heads):
            setattr(config, fields.kv_heads, num_kv)
        if fields.honours_head_dim:
            config.head_dim = head_dim
    _update_pruned_heads(config, attention_entries)
    return record


def _update_pruned_heads(config: Any, attention_entries: list[dict[str, Any]]) -> None:
    """transformers < 5 persists ``config.pruned_heads`` ({layer index: [original heads]})."""
    pruned = getattr(config, "pruned_heads", None)
    if not isinstance(pruned, dict):
        return
    for entry in attention_entries:
        index = _layer_index(entry["name"])
        gone = sorted(set(range(entry["original_num_heads"])) - set(entry["kept_heads"]))
        if index is not None and gone:
            pruned[index] = gone
