"""The original's own call sequences, run unchanged through prunekit.compat (issue 13, items 4, 5, 8, 9)."""
from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.compat import Pruning
from prunekit.config import load_config
from prunekit.errors import ConfigError

V1_YAML = textwrap.dedent("""
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
                names: ["fc"]
""")


# ---- item 5: update_items_for_all_pruners takes the 1.x names ------------------------------------------------
@pytest.mark.parametrize("key, value, field, expected", [
    ("update_frequency_on_step", 5, "pruning_frequency", 5),
    ("prune_type", "snip_momentum", "pruning_type", "snip_momentum"),
    ("prune_domain", "local", "pruning_scope", "local"),
    ("max_sparsity_ratio_per_layer", 0.5, "max_sparsity_ratio_per_op", 0.5),
    ("names", ["fc1"], "op_names", ("fc1",)),
    ("prune_layer_type", ["Conv2d", "Linear"], "pruning_op_types", ("Conv2d", "Linear")),
    ("excluded_names", ["fc3"], "excluded_op_names", ("fc3",)),
    ("extra_excluded_names", ["fc3"], "excluded_op_names", ("fc3",)),
    ("pattern", "tile_pattern_4x1", "pattern", "4x1"),
    ("parameters", {"reg_coeff": 0.25}, "reg_coeff", 0.25),
])
def test_update_items_accepts_every_1x_name_as_load_config_reads_it(key, value, field, expected):
    """1.x code injects start/end steps and frequencies with its own key names (the issue's repro:
    ``update_frequency_on_step=5`` was an unknown key)."""
    prune = Pruning(V1_YAML)
    prune.update_items_for_all_pruners(**{key: value})
    assert getattr(prune.config.pruners[0], field) == expected
    if key != "parameters":  # a 2.x extra; every other name means the same in a 1.x YAML block
        block = {"prune_type": "magnitude", "target_sparsity": 0.6, key: value}
        via_load = load_config({"pruning": {"approach": {"weight_compression_pytorch": block}}})
        assert getattr(via_load.pruners[0], field) == expected


def test_update_items_2x_names_and_conflicts():
    prune = Pruning(V1_YAML)
    prune.update_items_for_all_pruners(start_step=1, end_step=9, update_frequency_on_step=4)
    pruner = prune.config.pruners[0]
    assert (pruner.start_step, pruner.end_step, pruner.pruning_frequency) == (1, 9, 4)
    with pytest.raises(ConfigError, match="pruning_frequency.*1.x name says 3"):
        prune.update_items_for_all_pruners(pruning_frequency=2, update_frequency_on_step=3)
    with pytest.raises(ConfigError, match="start_epoch.*steps_per_epoch"):
        prune.update_items_for_all_pruners(start_epoch=1)
    with pytest.raises(ConfigError, match="frobnicate.*unknown key.*update_frequency_on_step"):
        prune.update_items_for_all_pruners(frobnicate=1)
    assert prune.config.pruners[0].pruning_frequency == 4  # a refused update changes nothing


# ---- item 8: the evaluation callbacks ------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def data(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


CALLBACK_CFG = dict(target_sparsity=0.5, pattern="4x1", pruning_type="snip_momentum", start_step=2, end_step=8,
                    pruning_frequency=2)


def run_callbacks(callbacks, model: nn.Module, steps: int, evaluate: bool) -> None:
    """The original's documented loop; with ``evaluate``, an evaluation (as its tests run it) after every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    callbacks.on_train_begin()
    for step in range(steps):
        callbacks.on_step_begin(step)
        x, y = data(step)
        nn.functional.cross_entropy(model(x), y).backward()
        callbacks.on_before_optimizer_step()
        optimizer.step()
        callbacks.on_after_optimizer_step()
        optimizer.zero_grad()
        callbacks.on_step_end()
        if evaluate:
            callbacks.on_before_eval()
            model.eval()
            with torch.no_grad():
                model(data(1000 + step)[0])
            model.train()
            callbacks.on_after_eval()


@pytest.mark.parametrize("form", ["prepare_compression", "1.x Pruning", "prunekit.Pruning"])
def test_eval_callbacks_exist_and_change_nothing(form):
    """The original's tests call on_before_eval() / on_after_eval() around evaluation; they were AttributeErrors.
    A run with them ends exactly as a run without them."""
    from prunekit.compat import WeightPruningConfig, prepare_compression

    def build(model):
        if form == "prepare_compression":
            return prepare_compression(model, WeightPruningConfig(**CALLBACK_CFG)).callbacks
        if form == "1.x Pruning":
            prune = Pruning(WeightPruningConfig(**CALLBACK_CFG))
            prune.model = model
            return prune
        return prunekit.Pruning(model, CALLBACK_CFG)

    results = []
    for evaluate in (False, True):
        model = Net()
        callbacks = build(model)
        run_callbacks(callbacks, model, 10, evaluate)
        results.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                        callbacks.state_dict()))
    (plain, plain_state), (evaluated, evaluated_state) = results
    assert evaluated_state["global_step"] == plain_state["global_step"] == 10
    for name in plain:
        assert torch.equal(plain[name], evaluated[name]), name
    for a, b in zip(plain_state["pruners"], evaluated_state["pruners"]):
        assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
        assert all(torch.equal(a["criterion"]["scores"][k], b["criterion"]["scores"][k])
                   for k in a["criterion"]["scores"])


def test_on_before_eval_evaluates_the_pruned_model():
    model = Net()
    pruning = prunekit.Pruning(model, dict(CALLBACK_CFG, pruning_type="magnitude", start_step=0, end_step=0,
                                             pruning_scope="local"))
    pruning.on_train_begin()
    zeros = model.fc1.weight == 0
    assert zeros.float().mean() == pytest.approx(0.5)
    with torch.no_grad():  # something outside the optimizer step wrote into pruned weights
        model.fc1.weight.add_(1.0)
    pruning.on_before_eval()
    assert torch.equal(model.fc1.weight == 0, zeros)
    pruning.on_after_eval()
    assert torch.equal(model.fc1.weight == 0, zeros) and pruning.global_step == 0


# ---- item 9: a pattern that tiles none of a pruner's layers --------------------------------------------------
@pytest.mark.parametrize("pruning_type", ["magnitude", "snip_momentum", "snip_momentum_progressive"])
def test_pruner_whose_pattern_tiles_nothing_leaves_its_layers_dense(pruning_type):
    """5x1 on 64-row layers: the original and the README leave such layers dense with a warning; only a config
    none of whose pruners prunes anything is an error."""
    model = Net()
    fc2_before = model.fc2.weight.detach().clone()
    cfg = {"pruning_type": pruning_type, "target_sparsity": 0.5, "start_step": 0, "end_step": 8,
           "pruning_frequency": 4,
           "pruning_configs": [{"op_names": ["fc1"], "pattern": "4x1"}, {"op_names": ["fc2"], "pattern": "5x1"}]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match="pruner1 prunes nothing"):
        pruning = prunekit.prepare_pruning(model, cfg, optimizer)
    assert [l.name for l in pruning.layers] == ["fc1"]
    for step in range(14):  # the last event at 8, its progressive phases up to 11
        x, y = data(step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5)
    assert torch.equal(model.fc2.weight, fc2_before)
    report = pruning.on_train_end(print_report=False)
    rows = {r.name: r for r in report.layers}
    assert rows["fc2"].status != "pruned" and "5x1" in report.table()
    state = pruning.state_dict()
    fresh = prunekit.Pruning(Net(), cfg)
    fresh.load_state_dict(state)
    assert fresh.global_step == 14


def test_config_whose_pruners_prune_nothing_is_a_selection_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(prunekit.SelectionError, match="no pruner of this config prunes anything.*5x1"):
            prunekit.Pruning(Net(), {"pruning_configs": [{"op_names": ["fc1", "fc2"], "pattern": "5x1"}]})


# ---- item 4: the original's auto-slim step by step -----------------------------------------------------------
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def bert_batches(n: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 100, (4, 12), generator=gen), torch.randint(0, 2, (4,), generator=gen))
            for _ in range(n)]


def auto_slim_training(steps: int):
    """The original's model_slim README and examples, step by step: parse_auto_slim_config ->
    WeightPruningConfig -> prepare_compression -> the callbacks through on_train_end()."""
    from prunekit.compat import WeightPruningConfig, parse_auto_slim_config, prepare_compression

    model = tiny_bert()
    pruning_configs = []
    pruning_configs += parse_auto_slim_config(model, ffn2_sparsity=0.5, mha_sparsity=0.5)
    configs = WeightPruningConfig(pruning_configs, target_sparsity=0.5, pruning_type="snip_momentum",
                                  start_step=1, end_step=5, pruning_frequency=2)
    compression_manager = prepare_compression(model, configs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compression_manager.callbacks.on_train_begin()
    model.train()
    for step, (ids, labels) in enumerate(bert_batches(steps)):
        compression_manager.callbacks.on_step_begin(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        compression_manager.callbacks.on_before_optimizer_step()
        optimizer.step()
        compression_manager.callbacks.on_after_optimizer_step()
        optimizer.zero_grad()
        compression_manager.callbacks.on_step_end()
    compression_manager.callbacks.on_train_end()
    return model.eval(), compression_manager


@pytest.mark.parametrize("slimmer", ["model_slim", "prunekit.slim"])
def test_auto_slim_step_by_step_needs_nothing_after_on_train_end(slimmer):
    """After on_train_end the zeros are in the weights and model_slim(model) just works, as in the original; it
    raised 'still carries pruning masks; call Pruning.detach(remove_masks=True)'."""
    from prunekit.compat import model_slim

    model, manager = auto_slim_training(8)
    ids = bert_batches(1)[0][0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    if slimmer == "model_slim":
        model = model_slim(model, round_multiplier=1)
    else:
        prunekit.slim(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert sum(layer.intermediate.dense.out_features for layer in model.bert.encoder.layer) == 64
    assert sum(layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer) == 8
    assert not [n for n, _ in model.named_buffers() if n.endswith("_prune_mask")]
    loss = model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss  # the slim model still trains
    loss.backward()


def test_slimming_while_the_schedule_still_runs_says_so():
    model, _ = auto_slim_training(4)  # the last event is at step 5
    params = sum(p.numel() for p in model.parameters())
    with pytest.raises(prunekit.SlimmingError, match="still running.*last event is at step 5"):
        prunekit.slim(model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert [n for n, _ in model.named_buffers() if n.endswith("_prune_mask")]


def test_on_after_compute_loss_returns_the_loss_as_the_original_did_without_distillation():
    from prunekit.compat import WeightPruningConfig, prepare_compression

    model = Net()
    callbacks = prepare_compression(model, WeightPruningConfig(**CALLBACK_CFG)).callbacks
    x, y = data(0)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    assert callbacks.on_after_compute_loss(x, out, loss) is loss
