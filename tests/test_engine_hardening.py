"""The engine against careless or hostile use (issue 13, items 7, 12, 14): a saved state is validated like a
config, re-running prepare_pruning replaces the first one, and a step GradScaler skips contributes nothing."""
from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

import prunekit
from conftest import MLP, batch, masks_of, train_step
from prunekit.errors import ConfigError

CFG = {"pruning_type": "snip_momentum", "target_sparsity": 0.6, "start_step": 2, "end_step": 8,
       "pruning_frequency": 2}


def trained(steps: int = 5):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    for step in range(steps):
        train_step(model, opt, step)
    return model, opt, pruning


def same_state(a: dict, b: dict) -> bool:
    """Two Pruning.state_dict() results are equal (tensors compared by value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# ---- item 14: load_state_dict validates the state like a config -----------------------------------------------
def _set(path, value):
    def edit(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return edit


BAD_STATES = {
    "masks {}": (_set(("pruners", 0, "masks"), {}), "pruners[0].masks"),
    "global_step negative": (_set(("global_step",), -3), "global_step: got -3"),
    "global_step string": (_set(("global_step",), "5"), "global_step: got '5'"),
    "global_step absurd": (_set(("global_step",), 10**30), "global_step"),
    "global_step bool": (_set(("global_step",), True), "global_step: got True"),
    "scores inf": (_set(("pruners", 0, "criterion", "scores", "fc1"),
                        lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))), r"scores\['fc1'\].*inf/NaN"),
    "scores NaN": (_set(("pruners", 0, "criterion", "scores", "fc2"),
                        lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))), r"scores\['fc2'\].*inf/NaN"),
    "scores wrong shape": (_set(("pruners", 0, "criterion", "scores", "fc2"), lambda t: t[:1]),
                           r"scores\['fc2'\].*shape"),
    "mask float": (_set(("pruners", 0, "masks", "fc1"), lambda t: t.float()), r"masks\['fc1'\].*bool"),
    "mask shape": (_set(("pruners", 0, "masks", "fc3"), lambda t: t[:1]), r"masks\['fc3'\].*shape"),
    "mask missing": (lambda s: s["pruners"][0]["masks"].pop("fc2"), "pruners[0].masks"),
    "unknown layer score": (_set(("pruners", 0, "criterion", "scores", "fc9"), torch.zeros(3)),
                            "criterion.scores"),
    "pruners not a list": (_set(("pruners",), {"0": 1}), "pruners"),
    "pruner count": (_set(("pruners",), lambda p: p + p), "pruners: got 2"),
    "last event in the future": (_set(("pruners", 0, "last_event_step"), 99), "last_event_step: got 99"),
    "history garbage": (_set(("pruners", 0, "history"), [("a", 1)]), "history"),
    "initial sparsity": (_set(("pruners", 0, "initial_sparsity"), 7.0), "initial_sparsity: got 7.0"),
    "missing key": (lambda s: s["pruners"][0].pop("criterion"), "pruners[0].criterion"),
    "not a dict": (None, "pruning state"),
    "version": (_set(("version",), 99), "version: got 99"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_state_is_one_config_error_and_changes_nothing(case):
    edit, message = BAD_STATES[case]
    model, opt, pruning = trained(7)  # events at 4 and 6 ran: masks, scores and history are non-trivial
    state = copy.deepcopy(pruning.state_dict())
    if edit is None:
        state = [state]
    else:
        edit(state)
    # the object to load into has its own, different progress
    other_model, other_opt, other = trained(3)
    before = copy.deepcopy(other.state_dict())
    weights = {n: p.detach().clone() for n, p in other_model.named_parameters()}
    with pytest.raises(ConfigError) as info:
        other.load_state_dict(state)
    assert len(str(info.value).splitlines()) == 1
    assert message in str(info.value) or re.search(message, str(info.value)), str(info.value)
    assert same_state(other.state_dict(), before), "a refused state must leave the pruning untouched"
    assert all(torch.equal(p, weights[n]) for n, p in other_model.named_parameters())
    train_step(other_model, other_opt, 3)  # and it still runs
    assert other.global_step == 4


def test_good_state_still_loads():
    model, opt, pruning = trained(7)
    _, _, other = trained(3)
    other.load_state_dict(pruning.state_dict())
    assert same_state(other.state_dict(), pruning.state_dict())


# ---- item 12: prepare_pruning twice on the same model and optimizer ------------------------------------------
def test_prepare_pruning_twice_replaces_the_first_with_a_warning():
    """A re-run notebook cell: two sets of hooks ran the schedule twice per step (wrong sparsity)."""
    once_model = MLP()
    once_opt = torch.optim.SGD(once_model.parameters(), lr=0.05, momentum=0.9)
    once = prunekit.prepare_pruning(once_model, CFG, once_opt)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = prunekit.prepare_pruning(model, CFG, opt)
    with pytest.warns(UserWarning, match="already pruned by an earlier Pruning.*replacing it"):
        second = prunekit.prepare_pruning(model, CFG, opt)
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 1
    for step in range(10):
        train_step(once_model, once_opt, step)
        train_step(model, opt, step)
    assert second.global_step == once.global_step == 10
    assert first.global_step == 0  # the first one no longer runs
    assert second.current_sparsity() == pytest.approx(0.6, abs=0.01)
    for name, mask in masks_of(once).items():
        assert torch.equal(masks_of(second)[name], mask), name
    for (name, p), q in zip(model.named_parameters(), once_model.parameters()):
        assert torch.equal(p, q), name


def test_prepare_pruning_again_with_another_pattern_replaces_the_first():
    """With another config the stacked hooks met masks of the other pattern's shape: a deep shape error."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prunekit.prepare_pruning(model, CFG, opt)
    for step in range(3):
        train_step(model, opt, step)
    with pytest.warns(UserWarning, match="replacing it"):
        pruning = prunekit.prepare_pruning(model, dict(CFG, pattern="2:4", target_sparsity=0.5), opt)
    for step in range(10):
        train_step(model, opt, step)
    for layer in pruning.layers:  # exactly 2 zeros in every group of 4 inputs
        groups = (layer.weight == 0).view(layer.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), layer.name


def test_disjoint_prunings_on_one_model_do_not_replace_each_other():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = prunekit.prepare_pruning(model, dict(CFG, op_names=["fc1"]), opt)
        b = prunekit.prepare_pruning(model, dict(CFG, op_names=["fc2"]), opt)
    for step in range(10):
        train_step(model, opt, step)
    assert a.global_step == b.global_step == 10
    assert a.current_sparsity() == pytest.approx(0.6, abs=0.02) and b.current_sparsity() == pytest.approx(0.6, abs=0.02)


def test_a_deep_copied_or_pickled_model_is_not_owned():
    model, opt, pruning = trained(3)
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = prunekit.Pruning(clone, CFG)  # no warning: the copy is not driven by `pruning`
    assert pruning.layers[0].holder._buffers.get("weight_prune_mask") is not None
    assert other.layers[0].holder is not pruning.layers[0].holder
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)


# ---- item 7: the README's explicit-callback loop under AMP ---------------------------------------------------
def _scaler():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unavailable: {exc}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("GradScaler('cpu') is disabled in this torch build")
    return scaler


def amp_callback_run(poison: dict[int, tuple[str, float]], steps: int = 12):
    """The README's callback loop under AMP; at the steps in ``poison`` a parameter's gradient gets inf/NaN,
    so GradScaler skips that optimizer step."""
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = _scaler()
    pruning = prunekit.Pruning(model, CFG)
    pruning.on_train_begin()
    for step in range(steps):
        pruning.on_step_begin()
        x, y = batch(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if step in poison:
            name, value = poison[step]
            model.get_parameter(name).grad.view(-1)[:5] = value
        scaler.unscale_(optimizer)
        pruning.on_before_optimizer_step()
        scaler.step(optimizer)
        scaler.update()
        pruning.on_after_optimizer_step()
        optimizer.zero_grad()
    return model, pruning


def plain_run(skip: set[int], steps: int = 12):
    """The same batches without AMP, the skipped steps left out altogether."""
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = prunekit.prepare_pruning(model, CFG, optimizer)
    for step in range(steps):
        if step not in skip:
            train_step(model, optimizer, step)
    return model, pruning


@pytest.mark.parametrize("poison", [
    {5: ("fc1.weight", float("nan"))},                                   # NaN scores crashed the next event
    {3: ("fc2.weight", float("inf")), 5: ("fc1.weight", float("inf"))},  # inf scores poisoned the ranking
    {4: ("out.bias", float("inf"))},                                     # a layer prunekit does not prune
], ids=["nan_in_pruned", "inf_twice", "inf_elsewhere"])
def test_a_step_grad_scaler_skips_contributes_nothing(poison):
    """'scores ... contain NaN' as soon as GradScaler skipped a step: a skipped step must neither score nor
    advance the schedule, exactly as with prepare_pruning's hooks."""
    model, pruning = amp_callback_run(poison)
    want_model, want = plain_run(set(poison))
    assert pruning.global_step == want.global_step == 12 - len(poison)
    assert [e.step for e in pruning.pruners[0].history] == [e.step for e in want.pruners[0].history]
    got_scores, want_scores = pruning.pruners[0].criterion.scores, want.pruners[0].criterion.scores
    assert got_scores.keys() == want_scores.keys()
    for name in want_scores:
        assert torch.equal(got_scores[name], want_scores[name]), name
    for name, mask in masks_of(want).items():
        assert torch.equal(masks_of(pruning)[name], mask), name
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        assert torch.equal(p, q), name
    assert pruning.current_sparsity() == pytest.approx(0.6, abs=0.01)
    from torch.optim import optimizer as torch_optimizer
    assert not torch_optimizer._global_optimizer_pre_hooks  # nothing stays registered after the loop


def test_callbacks_without_any_optimizer_step_still_drive_the_schedule():
    """A loop that never steps a torch optimizer between the callbacks (no update, or a hand-written one)."""
    model = MLP()
    pruning = prunekit.Pruning(model, dict(CFG, pruning_type="magnitude"))
    pruning.on_train_begin()
    for step in range(10):
        pruning.on_step_begin()
        pruning.on_before_optimizer_step()
        pruning.on_after_optimizer_step()
    assert pruning.global_step == 10
    assert pruning.current_sparsity() == pytest.approx(0.6, abs=0.01)


def test_hf_callback_moves_its_hooks_to_the_optimizer_of_a_second_train():
    """trainer.train() twice: the Trainer builds a new optimizer; the callback only set .optimizer, so its hooks
    stayed on the old one and the second run was never pruned."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from prunekit.integrations.transformers import PruningCallback

    model = MLP()
    callback = PruningCallback(CFG)
    state = SimpleNamespace(global_step=0)
    first = torch.optim.SGD(model.parameters(), lr=0.05)
    callback.on_train_begin(None, state, None, model=model, optimizer=first)
    train_step(model, first, 0)
    second = torch.optim.SGD(model.parameters(), lr=0.05)
    callback.on_train_begin(None, state, None, model=model, optimizer=second)
    for step in range(1, 10):
        train_step(model, second, step)
    assert callback.pruning.global_step == 10
    assert callback.pruning.current_sparsity() == pytest.approx(0.6, abs=0.01)
    assert not first._optimizer_step_pre_hooks
