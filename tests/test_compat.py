"""A user of the original pruner switches by changing the import line: every entry point, with its call shape."""
import io
import textwrap

import pytest
import torch
from torch import nn

from prunekit.compat import (Pruning, WeightPruningConfig, model_slim, parse_auto_slim_config,
                             prepare_compression, prepare_pruning)
from prunekit.errors import ConfigError

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 100, (4, 12), generator=gen), torch.randint(0, 2, (4,), generator=gen))
            for _ in range(n)]


def zero_fraction(model, names, exclude=("classifier",)):
    zeros = total = 0
    for name, module in model.named_modules():
        if any(n in name for n in names) and isinstance(module, nn.Linear) and not any(e in name for e in exclude):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def test_prepare_compression_callbacks_with_mixed_local_patterns():
    model = tiny_bert()
    config = WeightPruningConfig(
        pruning_configs=[{"op_names": ["attention"], "pattern": "2:4", "target_sparsity": 0.5},
                         {"op_names": ["intermediate", "output.dense"], "excluded_op_names": ["attention"]}],
        target_sparsity=0.75, pattern="4x1", start_step=2, end_step=12, pruning_frequency=2,
        excluded_op_names=["pooler"])
    manager = prepare_compression(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager.callbacks.on_train_begin()
    for epoch in range(2):
        manager.callbacks.on_epoch_begin(epoch)
        for step, (ids, labels) in enumerate(batches(8, epoch)):
            manager.callbacks.on_step_begin(step)
            model(input_ids=ids, labels=labels).loss.backward()
            manager.callbacks.on_before_optimizer_step()
            optimizer.step()
            manager.callbacks.on_after_optimizer_step()
            optimizer.zero_grad()
            manager.callbacks.on_step_end()
        manager.callbacks.on_epoch_end()
    manager.callbacks.on_train_end()
    attention = [m for n, m in model.named_modules() if "attention.self" in n and isinstance(m, nn.Linear)]
    for module in attention:  # exactly 2 zeros in every group of 4 inputs
        groups = (module.weight == 0).view(module.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())
    ffn = zero_fraction(model, ["intermediate.dense", "output.dense"], exclude=("classifier", "attention"))
    assert ffn == pytest.approx(0.75, abs=0.01)


def test_1x_pruning_class_with_yaml_and_update_items(tmp_path):
    path = tmp_path / "prune.yaml"
    path.write_text(textwrap.dedent("""
        pruning:
          approach:
            weight_compression_pytorch:
              start_step: 0
              end_step: 0
              excluded_names: ["pooler"]
              prune_layer_type: ["Linear"]
              target_sparsity: 0.6
              update_frequency_on_step: 2
              prune_type: magnitude
              pruners:
                - !Pruner
                    pattern: "tile_pattern_1x4"
                    names: ["encoder"]
    """))
    model = tiny_bert()
    prune = Pruning(str(path))
    prune.model = model
    prune.update_items_for_all_pruners(start_step=1, end_step=9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    prune.on_train_begin()
    for step, (ids, labels) in enumerate(batches(12)):
        prune.on_step_begin(step)
        model(input_ids=ids, labels=labels).loss.backward()
        prune.on_before_optimizer_step()
        optimizer.step()
        prune.on_after_optimizer_step()
        optimizer.zero_grad()
    assert zero_fraction(model, ["encoder"]) == pytest.approx(0.6, abs=0.01)
    assert prune.get_sparsity_ratio() == pytest.approx(0.6, abs=0.01)


def test_update_items_after_start_is_refused():
    prune = Pruning({"pruning_configs": [{"pattern": "1x1"}]})
    prune.model = tiny_bert()
    prune.on_train_begin()
    with pytest.raises(RuntimeError, match="before on_train_begin"):
        prune.update_items_for_all_pruners(end_step=3)


def test_prepare_pruning_auto_hooks_and_whole_model_save():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = WeightPruningConfig(target_sparsity=0.5, pattern="4x1", start_step=1, end_step=5,
                                 pruning_frequency=2, excluded_op_names=["pooler"])
    pruning = prepare_pruning(model, config, optimizer)
    for ids, labels in batches(8):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():  # evaluation forwards do not advance anything
        model(input_ids=batches(1)[0][0])
    assert pruning.global_step == 8
    assert pruning.current_sparsity() == pytest.approx(0.5, abs=0.01)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the original's torch.save patch made this fail
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))


def test_prepare_pruning_without_optimizer_says_why():
    with pytest.raises(ConfigError, match="optimizer"):
        prepare_pruning(tiny_bert(), WeightPruningConfig())


def test_weight_pruning_configs_do_not_share_state():
    first = WeightPruningConfig(target_sparsity=0.3, pattern="4x1")
    second = WeightPruningConfig(target_sparsity=0.9, pattern="1x1")
    assert (first.pruners[0].target_sparsity, first.pruners[0].pattern) == (0.3, "4x1")
    assert (second.pruners[0].target_sparsity, second.pruners[0].pattern) == (0.9, "1x1")


def test_auto_slim_then_model_slim_keeps_outputs():
    model = tiny_bert()
    configs = parse_auto_slim_config(model, ffn2_sparsity=0.5, mha_sparsity=0.5)
    assert {c["pattern"] for c in configs} == {"channelx1", "mha"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruning = prepare_pruning(model, WeightPruningConfig(pruning_configs=configs, start_step=0, end_step=0,
                                                         pruning_type="magnitude"), optimizer)
    pruning.detach(remove_masks=True)
    model.eval()
    ids = batches(1)[0][0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model_slim(model, round_multiplier=1)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    widths = [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer]
    assert sum(widths) == 64  # global channelx1 at 0.5 over two 64-wide FFNs removed 64 channels
    heads = [layer.attention.self.query.out_features // 8 for layer in model.bert.encoder.layer]
    assert sum(heads) == 4  # and half of the 8 heads
