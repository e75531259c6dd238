"""``pruning_type: block_mask`` (issue 13, item 11): the original's learnable block-mask scores, S ← 0.9·S + |∂L/∂B|
for a block multiplier B inside the forward, on the steps of [start_step, end_step], Linear layers only -- computed
without replacing any forward.

The reference below is the original's mechanism itself: each pruned Linear evaluated with ``W ⊙ expand(B)``
(B = the current keep-mask as floats, requiring grad) through ``torch.func.functional_call``, and ∂L/∂B taken by
autograd. prunekit's scores must equal it step by step, and its events must prune the blocks it ranks lowest.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import prunekit
from conftest import MLP, batch, masks_of
from prunekit.errors import ConfigError

# window [2, 10], events at 2 (initial sparsity), 6 and 10; scores may only come from steps 2..10
CFG = {"pruning_type": "block_mask", "pattern": "4x1", "target_sparsity": 0.5, "start_step": 2, "end_step": 10,
       "pruning_frequency": 4, "sparsity_decay_type": "linear"}
TOTAL = 13


def reference_mask_grads(model: nn.Module, pruning, step: int) -> dict[str, torch.Tensor]:
    """∂L/∂B of every pruned layer at the model's current weights and masks, on ``batch(step)``."""
    blocks, params = {}, dict(model.named_parameters())
    for layer in pruning.layers:
        b = layer.mask.to(torch.float32).requires_grad_(True)  # 1 = kept, 0 = pruned, one value per block
        blocks[layer.name] = b
        w = layer.weight.detach()
        params[f"{layer.name}.weight"] = (layer.bound.view(w) * b).reshape(w.shape)
    x, y = batch(step)
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(blocks.values()))
    return dict(zip(blocks, grads))


def run(model, opt, pruning, steps, reference=None):
    for step in steps:
        if reference is not None:  # the original's scores, computed on exactly what this step's forward sees
            grads = reference_mask_grads(model, pruning, step)
            if CFG["start_step"] <= step <= CFG["end_step"]:
                for name, g in grads.items():
                    old = reference.get(name)
                    reference[name] = g.abs() if old is None else 0.9 * old + g.abs()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def fresh(seed: int = 0):
    model = MLP(seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_scores_are_the_original_mask_gradient_and_events_prune_the_lowest():
    model, opt = fresh()
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    reference: dict[str, torch.Tensor] = {}
    crit = pruning.pruners[0].criterion
    checked_events = 0
    for step in range(TOTAL):
        history = len(pruning.pruners[0].history)
        run(model, opt, pruning, [step], reference)
        if step < CFG["start_step"]:
            assert not crit.scores, "block_mask accumulated outside [start_step, end_step]"
        elif step <= CFG["end_step"]:
            assert crit.scores.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(crit.scores[name], reference[name], rtol=1e-4, atol=1e-7)
        else:  # after the window nothing is added any more
            for name in reference:
                torch.testing.assert_close(crit.scores[name], reference[name], rtol=1e-4, atol=1e-7)
        if len(pruning.pruners[0].history) > history and pruning.pruners[0].history[-1].target > 0:
            # the event that ran after this step ranked the scores of steps <= step, all layers together
            ranked = torch.cat([reference[l.name].reshape(-1) for l in pruning.layers])
            pruned = torch.cat([~l.mask.reshape(-1) for l in pruning.layers])
            assert 0 < int(pruned.sum()) < pruned.numel()
            assert ranked[pruned].max() <= ranked[~pruned].min()
            checked_events += 1
    assert checked_events == 2  # the events at steps 6 and 10
    assert pruning.current_sparsity() == pytest.approx(0.5, abs=0.02)
    for layer in pruning.layers:  # pruned blocks are zero in the weights
        assert bool((layer.weight[~layer.bound.expand(layer.mask)] == 0).all())


def test_the_layer_stays_a_plain_module():
    """The original replaced Linear.forward until end_step; prunekit never touches forward or adds hooks."""
    model, opt = fresh()
    keys = list(model.state_dict())
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    for step in range(TOTAL):
        run(model, opt, pruning, [step])
        for layer in pruning.layers:
            module = layer.module
            assert type(module) is nn.Linear and "forward" not in module.__dict__
            assert not module._forward_pre_hooks and not module._forward_hooks
    assert list(model.state_dict()) == keys


class LoraLinear(nn.Linear):
    """A Linear with its own forward (a low-rank adapter): the original's forward replacement dropped it."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(n_in, 2) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(2, n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_a @ self.lora_b


def test_linear_subclasses_keep_their_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(16, 32), nn.ReLU(), LoraLinear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruning = prunekit.prepare_pruning(model, {**CFG, "start_step": 0, "end_step": 4, "pruning_frequency": 2},
                                       opt)
    for step in range(6):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert [l.name for l in pruning.layers] == ["0", "2"] and pruning.current_sparsity() > 0.4
    x = torch.randn(3, 32)
    lora = model[2]
    want = x @ lora.weight.T + lora.bias + x @ lora.lora_a @ lora.lora_b
    torch.testing.assert_close(lora(x), want)


def test_non_linear_layers_are_left_dense_with_a_warning():
    model = nn.Sequential(nn.Conv1d(4, 8, 1), nn.Flatten(), nn.Linear(8 * 5, 16), nn.ReLU(), nn.Linear(16, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruning = prunekit.Pruning(model, CFG)
    assert [l.name for l in pruning.layers] == ["2"]
    assert any("left dense" in str(w.message) and "Linear layers only" in str(w.message) for w in caught)


@pytest.mark.parametrize("pattern", ["2:4", "mha"])
def test_needs_a_block_pattern(pattern):
    with pytest.raises(ConfigError, match=r"^pattern: got .*block_mask") as info:
        prunekit.load_config({**CFG, "pattern": pattern})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("k", [1, 5, 8])
def test_resume_is_bit_identical(k, tmp_path):
    model, opt = fresh()
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    run(model, opt, pruning, range(TOTAL))
    want = ({n: p.detach().clone() for n, p in model.named_parameters()}, masks_of(pruning))

    model, opt = fresh()
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    run(model, opt, pruning, range(k))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruning": pruning.state_dict()},
               tmp_path / "ckpt.pt")
    model, opt = fresh(seed=7)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    pruning.load_state_dict(ckpt["pruning"])
    run(model, opt, pruning, range(k, TOTAL))
    params, masks = {n: p.detach() for n, p in model.named_parameters()}, masks_of(pruning)
    for name in want[0]:
        assert torch.equal(params[name], want[0][name]), name
    for name in want[1]:
        assert torch.equal(masks[name], want[1][name]), name


def test_the_1x_and_2x_config_forms_accept_it():
    v1 = prunekit.load_config({"pruning": {"approach": {"weight_compression_pytorch": {
        "prune_type": "block_mask", "pattern": "tile_pattern_4x1", "target_sparsity": 0.5}}}})
    v2 = prunekit.load_config({"pruning_configs": [{"pruning_type": "block_mask", "pattern": "4x1"}]})
    assert v1.pruners[0].pruning_type == v2.pruners[0].pruning_type == "block_mask"


@pytest.mark.parametrize("value, hint", [
    ("blockmask", "did you mean 'block_mask'?"),
    ("block_mask_progresive", "did you mean 'block_mask_progressive'?"),
    ("snip_momentum_progresive", "did you mean 'snip_momentum_progressive'?"),
    ("wanda", "prunekit.compat.prune_wanda"),
    ("sparse_gpt_progressive", "sparse_gpt has no progressive form"),
])
def test_unknown_pruning_types_suggest_pruning_types(value, hint):
    with pytest.raises(ConfigError) as info:
        prunekit.load_config({"pruning_type": value})
    text = str(info.value)
    assert text.startswith(f"pruning_type: got {value!r}; allowed: a criterion name (magnitude, ")
    assert "block_mask" in text
    assert hint in text
    assert "criterion_reduce_type" not in text  # never the name of another key
