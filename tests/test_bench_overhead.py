"""The overhead benchmark's harness: a short run of its protocol works and its statistics mean what they say."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_brackets_the_pooled_ratio(overhead):
    plain = [1.0, 1.1, 0.9, 1.0]
    pruned = [1.02, 1.13, 0.91, 1.02]
    low, high = overhead.ratio_interval(plain, pruned)
    assert low < sum(pruned) / sum(plain) < high
    # identical steps: no spread, the interval collapses onto 1
    assert overhead.ratio_interval(plain, plain) == [1.0, 1.0]


def test_crossover_and_control_runs(overhead):
    # two repeats swap which instance is pruned; "none" is the A/A control that prunes nothing
    runs = [overhead.run("2:4", steps=2, batch=2, seq=8, swap=bool(k)) for k in range(2)]
    assert [r["pruned_instance"] for r in runs] == ["copy", "original"]
    out = overhead.pooled(runs)
    assert out["repeats"] == 2 and out["pruned_instance_per_repeat"] == ["copy", "original"]
    low, high = out["mean_ratio_ci95"]
    assert low <= out["mean_ratio"] <= high
    control = overhead.run("none", steps=2, batch=2, seq=8)
    assert control["final_sparsity"] == 0.0 and control["events"] == 0
