"""Module-structure rules: the fallback when the model cannot be traced.

Each rule names, relative to one container module, the layers of a known FFN or attention layout. Head counts
come from the attention module's own attributes (the first name found in :data:`HEAD_ATTRS`). These rules only
run when tracing failed, and every group they produce is marked ``source="structure"``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.slimming.groups import AttentionGroup, FFNGroup
from prunekit.slimming.layers import layer_ops


@dataclass(frozen=True)
class FFNRule:
    producers: tuple[str, ...]
    consumer: str


@dataclass(frozen=True)
class AttentionRule:
    q: str
    k: str
    v: str
    o: str
    fused: bool = False  # one module writing [q | k | v] (GPT-2 c_attn)


FFN_RULES: list[FFNRule] = [
    FFNRule(("intermediate.dense",), "output.dense"),   # BERT, RoBERTa, ...
    FFNRule(("lin1",), "lin2"),                          # DistilBERT
    FFNRule(("c_fc",), "c_proj"),                        # GPT-2
    FFNRule(("fc1",), "fc2"),                            # ViT (transformers 5), OPT, CLIP, ...
    FFNRule(("gate_proj", "up_proj"), "down_proj"),      # Llama-style SwiGLU
    FFNRule(("w1", "w3"), "w2"),                         # Mixtral-style experts
    FFNRule(("dense_h_to_4h",), "dense_4h_to_h"),        # GPT-NeoX, Falcon
    FFNRule(("wi",), "wo"),                              # T5
]

ATTENTION_RULES: list[AttentionRule] = [
    AttentionRule("self.query", "self.key", "self.value", "output.dense"),   # BERT, RoBERTa
    AttentionRule("q_lin", "k_lin", "v_lin", "out_lin"),                      # DistilBERT
    AttentionRule("q_proj", "k_proj", "v_proj", "o_proj"),                    # Llama, ViT (transformers 5)
    AttentionRule("q_proj", "k_proj", "v_proj", "out_proj"),                  # OPT, BART, CLIP
    AttentionRule("c_attn", "c_attn", "c_attn", "c_proj", fused=True),        # GPT-2
]

HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")


def _layer(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if layer_ops(module) is not None else None


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix else rel


def _attr(modules: list[nn.Module], names: tuple[str, ...]) -> int | None:
    for module in modules:
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def find_by_structure(model: nn.Module) -> tuple[list[FFNGroup], list[AttentionGroup]]:
    """FFN and attention groups found by :data:`FFN_RULES` / :data:`ATTENTION_RULES`."""
    ffn: list[FFNGroup] = []
    attn: list[AttentionGroup] = []
    for prefix, container in model.named_modules():
        for rule in FFN_RULES:
            names = [_join(prefix, p) for p in rule.producers]
            consumer = _join(prefix, rule.consumer)
            layers = [_layer(model, n) for n in names + [consumer]]
            if any(m is None for m in layers):
                continue
            width = layer_ops(layers[-1]).in_features(layers[-1])
            if all(layer_ops(m).out_features(m) == width for m in layers[:-1]):
                ffn.append(FFNGroup(prefix, names, consumer, width, source="structure"))
                break
        for rule in ATTENTION_RULES:
            names = {r: _join(prefix, getattr(rule, r)) for r in "qkvo"}
            layers = {r: _layer(model, n) for r, n in names.items()}
            if any(m is None for m in layers.values()):
                continue
            group = _attention(prefix, container, rule, names, layers)
            if group is not None:
                attn.append(group)
                break
    return ffn, attn


def _attention(prefix: str, container: nn.Module, rule: AttentionRule, names: dict[str, str],
               layers: dict[str, nn.Module]) -> AttentionGroup | None:
    # Head attributes live on the container or on the parents of the projections (BERT: attention.self).
    holders = [container] + [container.get_submodule(getattr(rule, r).rpartition(".")[0])
                             for r in "qo" if "." in getattr(rule, r)]
    holders += [h.config for h in holders if getattr(h, "config", None) is not None]  # Llama keeps counts there
    heads = _attr(holders, HEAD_ATTRS)
    if heads is None:
        return None
    o_in = layer_ops(layers["o"]).in_features(layers["o"])
    head_dim = _attr(holders, HEAD_DIM_ATTRS) or o_in // heads
    out = {r: layer_ops(layers[r]).out_features(layers[r]) for r in "qkv"}
    if heads * head_dim != o_in:
        heads = o_in // head_dim  # the config may be stale after slimming; the layers are the truth
        if heads * head_dim != o_in:
            return None
    if rule.fused:
        kv_heads = _attr(holders, KV_HEAD_ATTRS) or heads
    else:
        kv_heads = out["k"] // head_dim
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    if kv_heads <= 0 or heads % kv_heads:
        return None
    if rule.fused:
        if out["q"] != q_width + 2 * kv_width:
            return None
        offsets = (0, q_width, q_width + kv_width)
    else:
        if (out["q"], out["k"], out["v"]) != (q_width, kv_width, kv_width):
            return None
        offsets = (0, 0, 0)
    return AttentionGroup(prefix, names["q"], names["k"], names["v"], names["o"], rule.fused, heads, kv_heads,
                          head_dim, *offsets, source="structure")
