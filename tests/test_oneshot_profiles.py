"""Sparsity profiles: uniform, OWL (formula, mean = target, bounds) and the dense observation pass."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import ConfigError
from prunekit.oneshot import block_linears, run_sequential
from prunekit.oneshot.profiles import OWL, PROFILES, make_profile, owl_sparsities
from prunekit.patterns import parse_pattern
from tests.llm_fixtures import tiny_llm


def test_uniform_needs_no_pass():
    profile = PROFILES.get("uniform")()
    assert not profile.needs_calibration_pass
    assert profile.layer_sparsities(None, 0.5, 3) == [0.5, 0.5, 0.5]


def test_unknown_profile_and_parameter_are_config_errors():
    with pytest.raises(ConfigError, match="profile: got 'owll'"):
        PROFILES.get("owll")
    with pytest.raises(ConfigError, match="allowed parameters for 'owl': m, lmbda"):
        make_profile("owl", lamda=0.1)
    with pytest.raises(ConfigError, match="owl.lmbda"):
        make_profile("owl", lmbda=0.7)
    with pytest.raises(ConfigError, match="profile: got 'owl'"):
        make_profile("owl").check_pattern(parse_pattern("2:4"))


def test_owl_formula_matches_the_paper_when_inside_the_band():
    # symmetric ratios: OWL's own formula already stays within target ± lmbda, so no clipping happens
    ratios = torch.tensor([1.0, 2.0, 3.0])
    out = owl_sparsities(ratios, 0.5, 0.08)
    # scaled to [0, 0.16] = [0, 0.08, 0.16]; 1 - (scaled - mean + 0.5)
    assert out == pytest.approx([0.58, 0.5, 0.42])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40),
       st.floats(0.05, 0.9), st.floats(0.0, 0.2))
def test_owl_mean_is_target_and_each_block_within_band(ratios, target, lmbda):
    out = owl_sparsities(torch.tensor(ratios, dtype=torch.float64), target, lmbda)
    assert len(out) == len(ratios)
    assert sum(out) / len(out) == pytest.approx(target, abs=1e-9)
    lo, hi = max(target - lmbda, 0.0), min(target + lmbda, 1.0)
    assert all(lo - 1e-12 <= s <= hi + 1e-12 for s in out)
    # more outliers -> never pruned more
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(out[a] >= out[b] - 1e-12 for a, b in zip(order, order[1:]))


def test_owl_skewed_ratios_are_clipped_and_rebalanced():
    # OWL's raw formula would give block 2 sparsity 0.5 - 4/3 * 0.08, outside the band
    out = owl_sparsities(torch.tensor([0.0, 0.0, 9.0]), 0.5, 0.08)
    assert sum(out) / 3 == pytest.approx(0.5)
    assert min(out) >= 0.42 - 1e-12 and max(out) <= 0.58 + 1e-12


def test_owl_observes_a_dense_pass_on_a_tiny_llama():
    model = tiny_llm("llama", layers=3)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    profile = make_profile("owl", m=3.0, lmbda=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def run_pass(observe):
        run_sequential(model, batches, lambda ctx: observe(ctx, block_linears(ctx.block)), progress=False)

    out = profile.layer_sparsities(run_pass, 0.5, 3)
    assert set(profile.outlier_ratios) == {0, 1, 2}
    assert all(0 <= r <= 100 for r in profile.outlier_ratios.values())
    assert sum(out) / 3 == pytest.approx(0.5)
    assert all(0.4 - 1e-9 <= s <= 0.6 + 1e-9 for s in out)
    # the pass is dense: it observes, never changes the weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_outlier_ratio_counts_scores_above_m_times_the_mean():
    # one block, one linear, hand-made: scores |W|·sqrt(mean x²)
    class Ctx:
        index = 0

        def collect(self, linears, kinds):
            from prunekit.oneshot.stats import InputStats

            s = InputStats(4, kinds)
            s.add(torch.tensor([[1.0, 1.0, 1.0, 2.0]]))
            return {"lin": s}

    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 10.0], [1.0, 1.0, 1.0, 1.0]]))
    profile = OWL(m=2.0)
    profile.observe(Ctx(), {"lin": lin})
    # scores [1,1,1,20, 1,1,1,2]: mean 3.5, threshold 7 -> one outlier of 8
    assert profile.outlier_ratios[0] == pytest.approx(100 / 8)
    with pytest.raises(ValueError, match="blocks \\[1\\] were not observed"):
        profile.sparsities(0.5, 2)
