"""``*_progressive``: each structured event's new zeros arrive over four phases, then the block mask holds."""
import io
import warnings

import pytest
import torch
from torch import nn

import prunekit

CONFIG = {"pruning_type": "magnitude_progressive", "pattern": "4x1", "target_sparsity": 0.75,
          "start_step": 0, "end_step": 16, "pruning_frequency": 8}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def run(model, config, steps, pruning_state=None, opt_state=None, start=0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruning = prunekit.Pruning(model, config, opt)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        pruning.load_state_dict(pruning_state)
    else:
        pruning.on_train_begin()
    trace = []
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 16, generator=gen)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        opt.zero_grad()
        trace.append(float((model[2].weight == 0).float().mean()))
    return pruning, opt, trace


def test_zeros_arrive_in_four_phases_and_end_structured():
    pruning, _, trace = run(mlp(), CONFIG, 24)
    # events at 8 and 16 (0 targets the initial sparsity); phases every 2 steps: 4 distinct levels per event
    first_event = trace[7:15]
    assert len(set(round(v, 6) for v in first_event)) >= 4
    assert all(b >= a for a, b in zip(trace, trace[1:]))  # never regrows within this run
    layer = pruning.layers[1]
    blocks = (layer.weight == 0).view(8, 4, 32).all(dim=1)
    partial = (layer.weight == 0).view(8, 4, 32).any(dim=1) & ~blocks
    assert not bool(partial.any())  # after the last phase every block is all-zero or untouched
    assert pruning.current_sparsity() == pytest.approx(0.75, abs=0.01)


def test_resume_inside_a_phase_is_bit_identical():
    whole, _, _ = run(mlp(), CONFIG, 24)
    model = mlp()
    pruning, opt, _ = run(model, CONFIG, 9)  # stops between the first event's phases
    assert pruning.pruners[0].progression.active
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruning": pruning.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed, _, _ = run(resumed_model, CONFIG, 24, saved["pruning"], saved["opt"], start=9)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_falls_back_with_a_warning_where_interpolation_cannot_apply():
    with pytest.warns(UserWarning, match="without progressive interpolation"):
        pruning = prunekit.Pruning(mlp(), {**CONFIG, "pattern": "2:4", "target_sparsity": 0.5})
    assert pruning.pruners[0].progression is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prunekit.Pruning(mlp(), CONFIG).pruners[0].progression is not None
