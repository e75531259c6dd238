"""The ``mha`` pattern: head masks over q/k/v rows and output-projection columns, trained, then slimmed."""
import pytest
import torch

import prunekit
from prunekit.patterns.heads import HeadLayer

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64))


FAMILIES = {"bert": bert, "gpt2": gpt2, "llama": llama}


def loss_of(model, ids):
    if isinstance(model, transformers.BertForSequenceClassification):
        return model(input_ids=ids, labels=ids[:, 0] % 2).loss
    return model(input_ids=ids, labels=ids).loss


def train(model, config, steps=8):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruning = prunekit.prepare_pruning(model, config, opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss_of(model, torch.randint(0, 100, (2, 12), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    return pruning


def pruned_units(layer: HeadLayer) -> list[int]:
    return (~layer.mask).nonzero().flatten().tolist()


def head_zero(layer: HeadLayer, unit: int) -> bool:
    """Every weight feature the unit owns (q/k/v rows, o columns) is zero, whatever the storage layout."""
    for role in layer.roles:
        picked = role.weight.index_select(role.axis, role.features[unit])
        if bool((picked != 0).any()):
            return False
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_local_head_pruning_zeroes_exactly_the_chosen_units(family):
    model = FAMILIES[family]()
    pruning = train(model, {"pattern": "mha", "target_sparsity": 0.5, "pruning_scope": "local",
                               "start_step": 1, "end_step": 5, "pruning_frequency": 2})
    layers = pruning.layers
    assert len(layers) == 2 and all(isinstance(l, HeadLayer) for l in layers)
    for layer in layers:
        units = layer.num_units
        assert units == (2 if family == "llama" else 4)  # GQA: a unit is a key/value group
        pruned = pruned_units(layer)
        assert len(pruned) == units // 2
        for unit in range(units):
            assert head_zero(layer, unit) == (unit in pruned)
    assert pruning.current_sparsity() == pytest.approx(0.5)


def test_gqa_unit_spans_its_query_heads_and_kv_head():
    model = llama()
    pruning = prunekit.Pruning(model, {"pattern": "mha", "pruning_type": "magnitude", "target_sparsity": 0.5,
                                       "pruning_scope": "local"})
    pruning.on_train_begin()
    layer = pruning.layers[0]
    attn = model.model.layers[0].self_attn
    unit = pruned_units(layer)[0]
    head_dim = attn.head_dim
    q_rows = slice(unit * 2 * head_dim, (unit + 1) * 2 * head_dim)  # 2 query heads per kv head
    kv_rows = slice(unit * head_dim, (unit + 1) * head_dim)
    assert bool((attn.q_proj.weight[q_rows] == 0).all()) and bool((attn.o_proj.weight[:, q_rows] == 0).all())
    assert bool((attn.k_proj.weight[kv_rows] == 0).all()) and bool((attn.v_proj.weight[kv_rows] == 0).all())
    assert int((attn.q_proj.weight == 0).sum()) == attn.q_proj.weight.numel() // 2


def test_every_block_keeps_a_head_and_global_caps_hold():
    model = bert()
    pruning = prunekit.Pruning(model, {"pattern": "mha", "pruning_type": "magnitude", "target_sparsity": 0.97,
                                       "pruning_scope": "local"})
    pruning.on_train_begin()
    assert [len(pruned_units(l)) for l in pruning.layers] == [3, 3]  # never the last head
    model = bert()
    pruning = prunekit.Pruning(model, {"pattern": "mha", "pruning_type": "magnitude", "target_sparsity": 0.5,
                                       "max_sparsity_ratio_per_op": 0.5, "pruning_scope": "global"})
    pruning.on_train_begin()
    assert [len(pruned_units(l)) for l in pruning.layers] == [2, 2]


def test_head_gradients_and_adam_state_are_masked():
    model = bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruning = prunekit.prepare_pruning(model, {"pattern": "mha", "pruning_type": "magnitude",
                                               "target_sparsity": 0.5}, opt)
    layer = pruning.layers[0]
    query = layer.roles[0]
    unit = pruned_units(layer)[0]
    rows = query.features[unit]
    checked = []
    opt.register_step_pre_hook(lambda o, a, k: checked.append(bool((query.weight.grad[rows] == 0).all())))
    for _ in range(3):
        loss_of(model, torch.randint(0, 100, (2, 12))).backward()
        opt.step()
        opt.zero_grad()
    assert checked == [True, True, True]
    assert bool((opt.state[query.weight]["exp_avg"][rows] == 0).all())
    assert head_zero(layer, unit)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_heads_slim_away_with_identical_outputs(family):
    model = FAMILIES[family]()
    pruning = train(model, {"pattern": "mha", "target_sparsity": 0.5, "start_step": 0, "end_step": 4,
                               "pruning_frequency": 2})
    pruning.detach(remove_masks=True)
    model.eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding in the second row
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    params = sum(p.numel() for p in model.parameters())
    prunekit.slimming.slim(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert sum(p.numel() for p in model.parameters()) < params
    if before.dim() == 3:  # token logits: compare the non-padded positions
        before, after = before[mask.bool()], after[mask.bool()]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
