"""Schedules: decay curves against their formulas, event steps, exact final targets, one-shot."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from prunekit.errors import ConfigError
from prunekit.schedules import DECAYS, Schedule

HYP = settings(max_examples=40, deadline=None)

FORMULAS = {
    "exp": lambda s0, s1, x: 1 - (1 - s0) * ((1 - s1) / (1 - s0)) ** x,
    "linear": lambda s0, s1, x: s0 + (s1 - s0) * x,
    "cos": lambda s0, s1, x: s0 + (s1 - s0) * (1 - math.cos(x * math.pi / 2)),
    "cube": lambda s0, s1, x: s0 + (s1 - s0) * x ** 3,
}

# Section 5 of the reference: start 2, end 20, frequency 3, target 0.8 (T = 6; events at 5, 8, ..., 20).
REFERENCE = {
    "exp": [0.235, 0.415, 0.553, 0.658, 0.738, 0.800],
    "linear": [0.133, 0.267, 0.400, 0.533, 0.667, 0.800],
    "cos": [0.027, 0.107, 0.234, 0.400, 0.593, 0.800],
    "cube": [0.004, 0.030, 0.100, 0.237, 0.463, 0.800],
}


@HYP
@given(st.sampled_from(sorted(FORMULAS)), st.floats(0.0, 0.6), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_decay_curves_match_their_formulas(name, s0, frac, x):
    s1 = s0 + (0.99 - s0) * frac
    assume(s1 > s0)
    assert DECAYS.get(name)(s0, s1, x) == pytest.approx(FORMULAS[name](s0, s1, x), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_example(name):
    sched = Schedule(start_step=2, end_step=20, frequency=3, target=0.8, decay=name)
    assert sched.num_increments == 6
    assert sched.event_steps() == [2, 5, 8, 11, 14, 17, 20]
    assert sched.target_at(0) == 0.0  # the event at start targets the initial sparsity
    got = [sched.target_at(i) for i in range(1, 7)]
    assert got == pytest.approx(REFERENCE[name], abs=6e-4)
    assert got[-1] == 0.8


@HYP
@given(st.sampled_from(sorted(FORMULAS)), st.integers(0, 50), st.integers(0, 60), st.integers(1, 12),
       st.floats(0.01, 0.98), st.floats(0.0, 0.5))
def test_targets_follow_the_curve_and_end_exactly(name, start, span, freq, target, initial):
    assume(initial < target)
    sched = Schedule(start, start + span, freq, target, name)
    total = span // freq
    steps = sched.event_steps()
    assert steps == [start + i * freq for i in range(total + 1)]
    assert sched.oneshot == (total == 0)
    values = [sched.target_at(i, initial) for i in range(total + 1)]
    assert values[-1] == target, "the final event must hit the target exactly"
    for i, v in enumerate(values[:-1]):
        assert v == pytest.approx(FORMULAS[name](initial, target, i / total), abs=1e-12)
    assert all(initial <= v <= target for v in values)
    assert all(a <= b + 1e-15 for a, b in zip(values, values[1:])), "sparsity must never decrease"


@HYP
@given(st.integers(0, 30), st.integers(0, 40), st.integers(1, 9), st.integers(0, 100))
def test_event_index_is_set_exactly_at_start_plus_k_freq(start, span, freq, step):
    sched = Schedule(start, start + span, freq, 0.5)
    steps = sched.event_steps()
    assert sched.final_step == steps[-1] <= start + span
    index = sched.event_index(step)
    if step in steps:
        assert index == steps.index(step)
    else:
        assert index is None


def test_oneshot_when_start_equals_end():
    sched = Schedule(7, 7, 5, 0.6)
    assert sched.oneshot and sched.num_increments == 0
    assert sched.event_steps() == [7]
    assert sched.target_at(0) == 0.6
    assert [sched.event_index(s) for s in (6, 7, 8)] == [None, 0, None]


def test_span_not_a_multiple_of_frequency_reaches_target_at_last_event():
    sched = Schedule(0, 10, 3, 0.7, "exp")
    assert sched.event_steps() == [0, 3, 6, 9]
    assert sched.target_at(3) == 0.7


def test_unknown_decay_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        prunekit.PrunerConfig(sparsity_decay_type="exponential")
    assert info.value.key == "sparsity_decay_type"
    with pytest.raises(ConfigError):
        DECAYS.get("quadratic")


# ---- through the engine --------------------------------------------------------------------------------
class Eight(nn.Module):
    """``layer`` has exactly 8 units under 4x1 (16 output rows = 4 blocks, 2 input columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 16)
        self.head = nn.Linear(16, 2)


def drive(pruning: prunekit.Pruning, steps: int) -> None:
    """The explicit callback loop without a model update (magnitude needs no gradient)."""
    pruning.on_train_begin()
    for _ in range(steps):
        pruning.on_step_begin()
        pruning.on_before_optimizer_step()
        pruning.on_after_optimizer_step()
        pruning.on_step_end()


@pytest.mark.parametrize("decay", sorted(FORMULAS))
@pytest.mark.parametrize("increments", range(1, 11))
def test_eight_units_at_half_end_with_exactly_four_pruned(decay, increments):
    """The original's int() truncation left 3 of 8 heads/blocks pruned for some T with exp; we need 4."""
    model = Eight()
    freq = 2
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5,
                                       "start_step": 1, "end_step": 1 + increments * freq,
                                       "pruning_frequency": freq, "sparsity_decay_type": decay,
                                       "op_names": ["^layer$"]})
    [layer] = pruning.layers
    assert layer.num_units == 8
    drive(pruning, 1 + increments * freq + 3)
    assert layer.bound.pruned_units(layer.mask) == 4
    assert int((model.layer.weight == 0).sum()) == 16
    history = pruning.pruners[0].history
    sched = pruning.pruners[0].schedule
    assert [e.step for e in history] == sched.event_steps()
    for i, event in enumerate(history):  # each event prunes its target, quantised to the nearest unit
        expected = sched.target_at(i)
        assert abs(event.sparsity * 8 - expected * 8) <= 0.5 + 1e-9, (i, event, expected)


@pytest.mark.parametrize("decay", sorted(FORMULAS))
def test_engine_sparsity_follows_the_reference_schedule(decay):
    model = nn.Sequential(nn.Linear(40, 400), nn.Linear(400, 2))  # 40 x 400 = 16000 units under 1x1
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.8,
                                       "start_step": 2, "end_step": 20, "pruning_frequency": 3,
                                       "sparsity_decay_type": decay})
    seen = {}
    pruning.on_train_begin()
    for step in range(24):
        pruning.on_step_begin()
        pruning.on_before_optimizer_step()
        seen[step] = pruning.current_sparsity()  # what step `step`'s optimizer update runs with
        pruning.on_after_optimizer_step()
    assert [seen[s] for s in (0, 1, 2, 3, 4)] == [0.0] * 5
    for i, s in enumerate((5, 8, 11, 14, 17, 20)):
        assert seen[s] == pytest.approx(REFERENCE[decay][i], abs=6e-4)
        assert seen[s + 1] == seen[s] and seen[s + 2] == seen[s]  # nothing happens between events
    assert seen[23] == 0.8


def test_oneshot_engine_prunes_once_at_start_step():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.75,
                                       "start_step": 3, "end_step": 3})
    sparsity = []
    pruning.on_train_begin()
    for _ in range(6):
        pruning.on_step_begin()
        pruning.on_before_optimizer_step()
        sparsity.append(pruning.current_sparsity())
        pruning.on_after_optimizer_step()
    assert sparsity == [0.0, 0.0, 0.0, 0.75, 0.75, 0.75]
    assert [e.step for e in pruning.pruners[0].history] == [3]


def test_engine_max_per_op_caps_the_schedule_target():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.9,
                                       "max_sparsity_ratio_per_op": 0.6, "start_step": 0, "end_step": 4})
    drive(pruning, 6)
    assert pruning.current_sparsity() == pytest.approx(0.6)
    assert torch.count_nonzero(model[0].weight) == 40
