"""Tiny random models of every supported family, padded inputs, and helpers that zero channels and heads.

Imported by the other ``test_slim_*`` files (``from test_slim_fixtures import ...``); it holds no tests itself.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

import transformers
from prunekit.slimming import AttentionGroup, FFNGroup
from prunekit.slimming.layers import layer_ops

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*zero-element tensors.*")

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 64, 32, 4, 2, 48


def _build(cls_name: str, config_name: str, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kw)
    return getattr(transformers, cls_name)(config).eval()


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "bert": lambda: _build("BertForSequenceClassification", "BertConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN),
    "distilbert": lambda: _build("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN,
                                 n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN),
    "roberta": lambda: _build("RobertaModel", "RobertaConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                              pad_token_id=1),
    "gpt2": lambda: _build("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                           n_head=HEADS, n_inner=FFN, n_positions=32, bos_token_id=0, eos_token_id=0),
    "llama": lambda: _build("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                            intermediate_size=FFN, max_position_embeddings=64),
    "vit": lambda: _build("ViTForImageClassification", "ViTConfig", image_size=16, patch_size=8,
                          hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=FFN, num_labels=3),
}


def inputs_for(name: str) -> dict[str, torch.Tensor]:
    """A batch of 2 with padding in the second row (left padding for decoders), or images for ViT."""
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(2, VOCAB, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    if name in ("gpt2", "llama"):
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    tensor = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if "attention_mask" in inputs and tensor.dim() == 3:  # padded positions carry no meaning
        tensor = tensor * inputs["attention_mask"][..., None].to(tensor.dtype)
    return tensor


def _zero(model: nn.Module, layer: str, axis: str, index: torch.Tensor) -> None:
    module = model.get_submodule(layer)
    ops = layer_ops(module)
    with torch.no_grad():
        module.weight.index_fill_(ops.out_dim if axis == "out" else ops.in_dim, index, 0.0)


def zero_channels(model: nn.Module, group: FFNGroup, channels: list[int], producers: bool = False) -> None:
    """What channelx1 on the second linear does: zero its input columns (and optionally the producers' rows)."""
    index = torch.tensor(channels, dtype=torch.long)
    _zero(model, group.consumer, "in", index)
    if producers:
        for p in group.producers:
            _zero(model, p, "out", index)


def zero_heads(model: nn.Module, group: AttentionGroup, heads: list[int]) -> None:
    """What the mha pattern does: zero q rows and o columns of each head (k/v rows too without GQA)."""
    for h in heads:
        for s in group.head_slices(h):
            module = model.get_submodule(s.module)
            with torch.no_grad():
                module.weight[s.weight_index(model)] = 0.0
