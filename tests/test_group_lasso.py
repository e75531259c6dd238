"""Group lasso as a proximal step on blocks: stays finite where the original diverged, and zeroes whole blocks."""
import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError


def relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def block_norms(weight):
    return weight.detach().view(weight.shape[0] // 4, 4, weight.shape[1]).norm(dim=1)


def train(model, config, steps=30, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    prunekit.prepare_pruning(model, config, opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("coeff", [1e-5, 1e-3])
def test_stays_finite_where_the_original_diverged(coeff):
    # the reference's failing case: a 2-layer ReLU MLP, 4x1, blocks with ~0 gradient (dead ReLU rows)
    model = train(relu_mlp(), {"pattern": "4x1", "pruning_type": "magnitude", "target_sparsity": 0.5,
                               "start_step": 0, "end_step": 29, "pruning_frequency": 10,
                               "reg_type": "group_lasso", "reg_coeff": coeff})
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shrinks_blocks_and_zeroes_the_weak_ones():
    plain = train(relu_mlp(), {"pattern": "4x1", "pruning_type": "magnitude", "target_sparsity": 0.0,
                               "start_step": 0, "end_step": 29})
    lasso = train(relu_mlp(), {"pattern": "4x1", "pruning_type": "magnitude", "target_sparsity": 0.0,
                               "start_step": 0, "end_step": 29, "reg_type": "group_lasso", "reg_coeff": 0.05})
    plain_norms, lasso_norms = block_norms(plain[2].weight), block_norms(lasso[2].weight)
    assert lasso_norms.sum() < 0.8 * plain_norms.sum()
    zero_blocks = int((lasso_norms == 0).sum())
    assert zero_blocks > 0  # the proximal step produces exact zeros, whole blocks at a time
    w = lasso[2].weight.detach().view(8, 4, 32)
    assert bool(((w == 0).all(dim=1) == (lasso_norms == 0)).all())


def test_only_inside_the_pruning_window():
    model = relu_mlp()
    before = model[2].weight.detach().clone()
    pruning = prunekit.Pruning(model, {"pattern": "4x1", "pruning_type": "magnitude", "target_sparsity": 0.0,
                                       "start_step": 5, "end_step": 9, "reg_type": "group_lasso",
                                       "reg_coeff": 0.1})
    pruning.on_before_optimizer_step()
    pruning.on_after_optimizer_step()  # step 0: outside the window, nothing shrinks
    assert torch.equal(model[2].weight, before)


def test_needs_a_block_pattern():
    with pytest.raises(ConfigError, match="reg_type"):
        prunekit.Pruning(relu_mlp(), {"pattern": "2:4", "target_sparsity": 0.5, "reg_type": "group_lasso",
                                      "reg_coeff": 0.1})
