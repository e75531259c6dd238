"""Exact resume: a run checkpointed at step k and continued in fresh objects ends bit-identical to an
uninterrupted run; a checkpoint that does not fit the model is refused with a clear error."""
from __future__ import annotations

import functools

import pytest
import torch

import prunekit
from conftest import MLP, batch, masks_of, train_step

# events at 3, 5, 7, 9 (3 targets the initial sparsity); snip_momentum accumulates from step 0 on
CFG = {"pruning_type": "snip_momentum", "target_sparsity": 0.8, "start_step": 3, "end_step": 9,
       "pruning_frequency": 2, "sparsity_decay_type": "exp"}
TOTAL = 13


def fresh(seed: int = 0):
    model = MLP(seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))


def snapshot(model, pruning):
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, masks_of(pruning),
            {k: v.clone() for k, v in pruning.pruners[0].criterion.scores.items()},
            pruning.global_step, [(e.step, e.target, e.sparsity) for e in pruning.pruners[0].history])


def callback_loop(model, opt, pruning, steps) -> None:
    """The explicit callback loop (Pruning built without the optimizer, so the callbacks do the work)."""
    for step in steps:
        pruning.on_step_begin(step)
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        pruning.on_before_optimizer_step()
        opt.step()
        pruning.on_after_optimizer_step()
        opt.zero_grad(set_to_none=True)


@functools.lru_cache(maxsize=None)
def uninterrupted(callbacks: bool = False):
    model, opt = fresh()
    if callbacks:
        pruning = prunekit.Pruning(model, CFG)
        pruning.on_train_begin()
        callback_loop(model, opt, pruning, range(TOTAL))
    else:
        pruning = prunekit.prepare_pruning(model, CFG, opt)
        for step in range(TOTAL):
            train_step(model, opt, step)
    return snapshot(model, pruning)


def assert_same(got, want):
    params, masks, scores, step, history = got
    w_params, w_masks, w_scores, w_step, w_history = want
    assert step == w_step
    assert history == w_history
    assert params.keys() == w_params.keys() and masks.keys() == w_masks.keys()
    for name in w_params:
        assert torch.equal(params[name], w_params[name]), f"parameter {name} differs"
    for name in w_masks:
        assert torch.equal(masks[name], w_masks[name]), f"mask of {name} differs"
    for name in w_scores:
        assert torch.equal(scores[name], w_scores[name]), f"scores of {name} differ"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 9, 10, 12], ids=lambda k: f"stop_at_{k}")
@pytest.mark.parametrize("order", ["load_then_prepare", "prepare_then_load"])
def test_resume_is_bit_identical(k, order, tmp_path):
    model, opt = fresh()
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    for step in range(k):
        train_step(model, opt, step)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(pruning.state_dict(), tmp_path / "pruning.pt")
    del model, opt, pruning

    model, opt = fresh(seed=99)  # a different init: everything must come from the checkpoint
    if order == "load_then_prepare":
        model.load_state_dict(torch.load(tmp_path / "model.pt"))
        pruning = prunekit.prepare_pruning(model, CFG, opt)
    else:
        pruning = prunekit.prepare_pruning(model, CFG, opt)
        model.load_state_dict(torch.load(tmp_path / "model.pt"))
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    pruning.load_state_dict(torch.load(tmp_path / "pruning.pt"))  # weights_only=True: plain data only
    assert pruning.global_step == k
    for step in range(k, TOTAL):
        train_step(model, opt, step)
    assert_same(snapshot(model, pruning), uninterrupted())


@pytest.mark.parametrize("k", [2, 5, 11])
def test_resume_with_explicit_callbacks(k, tmp_path):
    """The callback-driven loop resumes exactly too."""
    model, opt = fresh()
    pruning = prunekit.Pruning(model, CFG)
    pruning.on_train_begin()
    callback_loop(model, opt, pruning, range(k))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruning": pruning.state_dict()},
               tmp_path / "ckpt.pt")
    model, opt = fresh(seed=5)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pruning = prunekit.Pruning(model, CFG)
    pruning.load_state_dict(ckpt["pruning"])
    pruning.on_train_begin()
    callback_loop(model, opt, pruning, range(k, TOTAL))
    assert_same(snapshot(model, pruning), uninterrupted(callbacks=True))


def test_state_dict_holds_masks_scores_and_step():
    model, opt = fresh()
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    for step in range(6):
        train_step(model, opt, step)
    state = pruning.state_dict()
    assert state["global_step"] == 6
    [pstate] = state["pruners"]
    assert pstate["layers"] == ["fc1", "fc2", "fc3"]
    for layer in pruning.layers:
        assert torch.equal(pstate["masks"][layer.name], layer.mask)
        assert pstate["masks"][layer.name] is not layer.mask, "the state must be a copy, not the live mask"
    assert pstate["last_event_step"] == 5


# ---- checkpoints that do not fit ------------------------------------------------------------------------
def saved_state(cfg=None, model=None):
    model = model or MLP()
    pruning = prunekit.Pruning(model, cfg or {"pruning_type": "magnitude", "target_sparsity": 0.5})
    pruning.on_train_begin()
    return pruning.state_dict()


def test_state_for_a_different_selection_is_refused():
    state = saved_state()
    other = prunekit.Pruning(MLP(), {"pruning_type": "magnitude", "target_sparsity": 0.5,
                                     "op_names": ["fc1", "fc2"]})
    with pytest.raises(ValueError) as info:
        other.load_state_dict(state)
    message = str(info.value)
    assert "fc3" in message and "fc1" in message
    assert other.current_sparsity() == 0.0, "a refused state must not change the masks"


def test_state_with_a_different_number_of_pruners_is_refused():
    state = saved_state()
    other = prunekit.Pruning(MLP(), {"pruning_configs": [{"op_names": ["fc1"]}, {"op_names": ["fc2", "fc3"]}]})
    with pytest.raises(ValueError, match="pruners"):
        other.load_state_dict(state)


def test_unknown_state_version_is_refused():
    state = saved_state()
    state["version"] = 999
    with pytest.raises(ValueError, match="version"):
        prunekit.Pruning(MLP(), {"pruning_type": "magnitude"}).load_state_dict(state)


def test_state_saved_under_another_pattern_is_refused():
    """A 4x1 mask [8,1,16,1] has the numel of a 1x4 mask [32,1,4,1]: it must not be silently reshaped."""
    state = saved_state({"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5})
    other = prunekit.Pruning(MLP(), {"pruning_type": "magnitude", "pattern": "1x4", "target_sparsity": 0.5})
    with pytest.raises(ValueError, match="fc1"):
        other.load_state_dict(state)
    assert other.current_sparsity() == 0.0


def test_state_for_a_model_of_another_shape_is_refused_clearly():
    """Same layer names, other widths: a ValueError naming the layer, not a bare reshape error."""
    state = saved_state()
    wider = MLP(sizes=(16, 64, 32, 32, 4))
    other = prunekit.Pruning(wider, {"pruning_type": "magnitude", "target_sparsity": 0.5})
    with pytest.raises(ValueError, match="fc1"):
        other.load_state_dict(state)
