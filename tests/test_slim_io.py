"""Slimmed models save and load back with the same shapes and outputs."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from prunekit.slimming import detect, load_slimmed, save_slimmed, slim
from test_slim_fixtures import FAMILIES, FFN, inputs_for, outputs, zero_channels, zero_heads


def _slimmed(family: str, uniform: bool = False):
    model = FAMILIES[family]()
    found = detect(model)
    for i, g in enumerate(found.ffn):
        zero_channels(model, g, list(range(0, FFN, 2 if uniform or i == 0 else 3)))
    for i, g in enumerate(found.attention):
        zero_heads(model, g, [0, 1] if uniform or family == "llama" else [i])
    slim(model)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_keeps_per_layer_shapes_and_outputs(family: str, tmp_path) -> None:
    model = _slimmed(family)
    x = inputs_for(family)
    save_slimmed(model, tmp_path)
    loaded = load_slimmed(tmp_path)
    assert type(loaded) is type(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert torch.allclose(outputs(loaded, x), outputs(model, x), atol=1e-6)
    assert loaded.config.prunekit_slimming == model.config.prunekit_slimming


def test_uniform_llama_loads_with_plain_from_pretrained(tmp_path) -> None:
    """Families that honour config.head_dim need no prunekit code to load a uniformly slimmed model."""
    model = _slimmed("llama", uniform=True)
    save_slimmed(model, tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = inputs_for("llama")
    assert torch.allclose(outputs(plain, x), outputs(model, x), atol=1e-6)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_plain_module_round_trip(tmp_path) -> None:
    model, x = Block(), torch.randn(3, 8)
    with torch.no_grad():
        model.fc2.weight[:, 5:20] = 0
    expected = model(x)
    slim(model, example_inputs=x)
    assert model.fc1.out_features == 17
    save_slimmed(model, tmp_path)
    loaded = load_slimmed(tmp_path, model=Block())
    assert loaded.fc2.in_features == 17 and loaded.fc2.weight.shape == (8, 17)
    assert torch.allclose(loaded(x), expected, atol=1e-6)


def test_classifier_made_from_a_base_checkpoint_loads_back(tmp_path) -> None:
    """A classifier built from a base checkpoint inherits ``architectures: [BertModel]``; save_slimmed must record
    the class it really is, or load_slimmed builds a BertModel and fails on the classifier's keys."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()
    assert model.config.architectures == ["BertModel"]  # what the recipes start from
    found = detect(model)
    zero_channels(model, found.ffn[0], list(range(0, 32, 2)))
    slim(model)
    ids = torch.randint(0, 50, (2, 7))
    expected = model(input_ids=ids).logits
    save_slimmed(model, tmp_path / "slim")
    loaded = load_slimmed(tmp_path / "slim")
    assert type(loaded) is transformers.BertForSequenceClassification
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
