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


# --- the learning rate the optimizer used scales the shrink, in every form (issue 13, item 10) ---------------
LASSO = {"pattern": "4x1", "pruning_type": "magnitude", "target_sparsity": 0.0, "start_step": 0, "end_step": 9,
         "reg_type": "group_lasso", "reg_coeff": 0.1}


def zero_grad_step(model):
    """A backward whose gradients are all zero: SGD leaves the weights alone, so only the shrink moves them."""
    (0.0 * model(torch.randn(4, 16)).sum()).backward()


def expected_shrink(norms, threshold):
    return (norms - threshold).clamp(min=0.0)


def test_callbacks_without_an_optimizer_refuse_group_lasso_up_front():
    # the original's callback form knows no optimizer; prunekit used lr = 1.0 and zeroed 97 % in two steps
    model = relu_mlp()
    before = model[2].weight.detach().clone()
    pruning = prunekit.Pruning(model, LASSO)
    with pytest.raises(ConfigError, match=r"^optimizer: got None; .*pruning\.optimizer = optimizer") as info:
        pruning.on_train_begin()
    assert "\n" not in str(info.value)
    zero_grad_step(model)
    with pytest.raises(ConfigError, match="optimizer"):  # also when on_train_begin is skipped
        pruning.on_before_optimizer_step()
        pruning.on_after_optimizer_step()
    assert torch.equal(model[2].weight, before)


def test_callbacks_with_a_recorded_optimizer_use_its_lr_not_the_schedulers_next():
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 100.0 ** step)  # lr x100 after every step
    pruning = prunekit.Pruning(model, LASSO)
    pruning.optimizer = opt  # recorded, not hooked: the callbacks drive
    pruning.on_train_begin()
    norms = block_norms(model[2].weight)
    lrs = []
    for _ in range(2):
        zero_grad_step(model)
        pruning.on_before_optimizer_step()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # before the after-step callback: the step above still used the old lr
        pruning.on_after_optimizer_step()
        opt.zero_grad()
    assert lrs == [pytest.approx(1e-4), pytest.approx(1e-2)]
    want = expected_shrink(expected_shrink(norms, 1e-4 * 0.1), 1e-2 * 0.1)
    torch.testing.assert_close(block_norms(model[2].weight), want, rtol=1e-5, atol=1e-7)
    assert float((model[2].weight == 0).float().mean()) < 0.05  # not the 97 % of lr = 1.0


@pytest.mark.parametrize("form", ["prepare_pruning", "Pruning(optimizer)", "prepare_compression"])
def test_every_form_shrinks_by_the_lr_used(form):
    from prunekit.compat import prepare_compression

    model = relu_mlp()
    opt = torch.optim.SGD([{"params": [model[0].weight, model[0].bias], "lr": 1e-3},
                           {"params": [model[2].weight, model[2].bias, model[4].weight, model[4].bias],
                            "lr": 1e-4}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=10.0)
    if form == "prepare_pruning":
        pruning = prunekit.prepare_pruning(model, LASSO, opt)
    elif form == "Pruning(optimizer)":
        pruning = prunekit.Pruning(model, LASSO, opt)
        pruning.on_train_begin()
    else:
        pruning = prepare_compression(model, LASSO, optimizer=opt).callbacks
        pruning.on_train_begin()
    norms0, norms2 = block_norms(model[0].weight), block_norms(model[2].weight)
    for _ in range(2):
        zero_grad_step(model)
        pruning.on_before_optimizer_step()  # no-ops when hooked; harmless
        opt.step()
        pruning.on_after_optimizer_step()
        sched.step()
        opt.zero_grad()
    torch.testing.assert_close(block_norms(model[0].weight),
                               expected_shrink(expected_shrink(norms0, 1e-4), 1e-3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(block_norms(model[2].weight),
                               expected_shrink(expected_shrink(norms2, 1e-5), 1e-4), rtol=1e-5, atol=1e-7)


def test_a_weight_the_optimizer_does_not_train_is_not_shrunk():
    model = relu_mlp()
    opt = torch.optim.SGD([model[0].weight], lr=0.1)  # model[2] is frozen as far as the optimizer goes
    before = model[2].weight.detach().clone()
    prunekit.prepare_pruning(model, LASSO, opt)
    zero_grad_step(model)
    opt.step()
    assert torch.equal(model[2].weight, before)
    assert not torch.equal(model[0].weight, model[0].weight.detach() * 0)


def test_the_1x_pruning_class_takes_the_optimizer_before_or_after_the_engine_exists():
    from prunekit.compat import Pruning as V1Pruning

    for when in ("before", "after"):
        model = relu_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        prune = V1Pruning(LASSO)
        prune.model = model
        if when == "before":
            prune.optimizer = opt
            prune.on_train_begin()
        else:
            with pytest.raises(ConfigError, match="optimizer"):
                prune.on_train_begin()
            prune.optimizer = opt
            prune.on_train_begin()
        assert prune.optimizer is opt
        norms = block_norms(model[2].weight)
        zero_grad_step(model)
        prune.on_before_optimizer_step()
        opt.step()
        prune.on_after_optimizer_step()
        torch.testing.assert_close(block_norms(model[2].weight), expected_shrink(norms, 1e-5), rtol=1e-5,
                                   atol=1e-7)
