"""Ranking: exact lowest-k per layer and across layers, against concatenate-and-sort oracles."""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit import ranking
from prunekit.ranking import Quota, lowest
from prunekit.ranking import allocate as engine_allocate

HYP = settings(max_examples=50, deadline=None)


@pytest.fixture(autouse=True, scope="module", params=["kernel", "eager"])
def _radix_path(request):
    """Every ranking test runs on both histogram paths: the fused CPU kernel (when it builds) and eager."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_CPU_KERNELS", "1" if request.param == "kernel" else "0")
        yield request.param

# floats that stress the key mapping: signed zeros, subnormals, infinities, huge and tiny magnitudes, ties
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, float("inf"), float("-inf"), 0.5, 2.0]
score = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False))
scores = st.lists(score, min_size=1, max_size=60)


def oracle_order(values: list[float]) -> list[int]:
    """Indices sorted by value (−0.0 == +0.0), ties by index: the documented order."""
    return sorted(range(len(values)), key=lambda i: (values[i] + 0.0, i))


def as_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def chunked(monkeypatch) -> dict:
    """Force several small chunks (and no held keys, where supported) so chunk boundaries are exercised."""
    monkeypatch.setattr(ranking, "CHUNK", 7)
    return {"hold": False} if "hold" in inspect.signature(engine_allocate).parameters else {}


def allocate(*args, **kwargs) -> list[torch.Tensor]:
    """prunekit.ranking.allocate, with each layer's result as a flat bool mask (checked against its count)."""
    out = []
    for sel in engine_allocate(*args, **kwargs):
        mask = sel.mask() if hasattr(sel, "mask") else sel
        assert mask.dtype == torch.bool
        if hasattr(sel, "count"):
            assert int(mask.sum()) == sel.count, "a Selection's count disagrees with its mask"
        out.append(mask)
    return out


def oracle_allocate(layers: list[list[float]], quotas: list[Quota], k: int) -> list[list[int]]:
    """Water-filling by brute force: every layer first takes its floor (its own lowest), then the globally
    lowest remaining units (ties: layer order, then index) go to layers below their cap until k are pruned."""
    taken = [set(oracle_order(vals)[:q.lo]) for vals, q in zip(layers, quotas)]
    remaining = k - sum(q.lo for q in quotas)
    pool = sorted(((v + 0.0, li, ui) for li, vals in enumerate(layers) for ui, v in enumerate(vals)))
    for _, li, ui in pool:
        if remaining <= 0:
            break
        if ui in taken[li] or len(taken[li]) >= quotas[li].cap:
            continue
        taken[li].add(ui)
        remaining -= 1
    return [sorted(t) for t in taken]


# ---- lowest ---------------------------------------------------------------------------------------------
@HYP
@given(scores, st.data())
def test_lowest_is_exactly_the_k_smallest(values, data):
    k = data.draw(st.integers(0, len(values)))
    x = as_tensor(values)
    got = lowest(lambda: x, k, len(values))
    assert got.dtype == torch.bool and got.shape == (len(values),)
    assert int(got.sum()) == k
    assert sorted(torch.nonzero(got).flatten().tolist()) == sorted(oracle_order(x.tolist())[:k])


@HYP
@given(scores, st.data())
def test_lowest_chunked_matches_oracle(values, data):
    with pytest.MonkeyPatch.context() as mp:
        kw = chunked(mp)
        k = data.draw(st.integers(0, len(values)))
        x = as_tensor(values)
        got = lowest(lambda: x, k, len(values), "layer", **kw)
    assert sorted(torch.nonzero(got).flatten().tolist()) == sorted(oracle_order(x.tolist())[:k])


def test_lowest_ties_zeros_and_negative_zero_are_deterministic():
    x = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -0.0, 0.0, 5.0])
    for k in range(9):
        first = lowest(lambda: x, k, 8)
        again = lowest(lambda: x.clone(), k, 8)
        assert torch.equal(first, again)
        expected = torch.zeros(8, dtype=torch.bool)
        expected[[0, 1, 2, 3, 5, 6, 4, 7][:k]] = True  # the six zeros in index order, then 1.0, then 5.0
        assert torch.equal(first, expected), k


def test_lowest_many_equal_scores_takes_lower_indices():
    x = torch.full((1000,), 0.25)
    x[::7] = 0.125
    got = lowest(lambda: x, 200, 1000)
    low = list(range(0, 1000, 7))  # 143 strictly lower scores first
    rest = [i for i in range(1000) if i % 7][: 200 - len(low)]
    assert sorted(torch.nonzero(got).flatten().tolist()) == sorted(low + rest)


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 0.0], [float("nan")], [float("nan"), float("inf")]])
def test_nan_scores_raise_naming_the_layer(bad):
    x = torch.tensor(bad)
    with pytest.raises(ValueError, match="enc.fc1.*NaN|NaN.*enc.fc1"):
        lowest(lambda: x, 1, len(bad), "enc.fc1")
    with pytest.raises(ValueError, match="NaN"):
        allocate([lambda: torch.rand(5), lambda: x], [Quota(5), Quota(len(bad))], 3, ["a", "enc.fc1"])


# ---- allocate -------------------------------------------------------------------------------------------
layer_lists = st.lists(scores, min_size=1, max_size=5)


@HYP
@given(layer_lists, st.data())
def test_allocate_without_quotas_is_concatenate_and_sort(layers, data):
    total = sum(map(len, layers))
    k = data.draw(st.integers(0, total))
    tensors = [as_tensor(v) for v in layers]
    got = allocate([lambda t=t: t for t in tensors], [Quota(len(v)) for v in layers], k)
    flat = torch.cat(tensors).tolist()
    chosen = set(oracle_order(flat)[:k])  # index order across the concatenation = layer order, then index
    offsets = [sum(map(len, layers[:i])) for i in range(len(layers))]
    for mask, off, vals in zip(got, offsets, layers):
        assert mask.shape == (len(vals),)
        assert sorted(torch.nonzero(mask).flatten().tolist()) == sorted(i - off for i in chosen
                                                                         if off <= i < off + len(vals))
    assert sum(int(m.sum()) for m in got) == k


@st.composite
def quota_case(draw):
    layers = draw(layer_lists)
    quotas = []
    for vals in layers:
        hi = draw(st.integers(0, len(vals)))
        lo = draw(st.integers(0, hi))
        quotas.append(Quota(len(vals), lo, draw(st.sampled_from([hi, None])) if hi == len(vals) else hi))
    k = draw(st.integers(0, sum(map(len, layers))))
    return layers, quotas, k


def check_allocation(layers, quotas, k, got):
    counts = [int(m.sum()) for m in got]
    lo_total, hi_total = sum(q.lo for q in quotas), sum(q.cap for q in quotas)
    assert sum(counts) == min(max(k, lo_total), hi_total), "global total wrong"
    for c, q in zip(counts, quotas):
        assert q.lo <= c <= q.cap, "a per-layer floor or cap is violated"
    exact = [as_tensor(v).tolist() for v in layers]  # the float32 values ranked (-1e-45 rounds to -1.4e-45)
    expected = oracle_allocate(exact, quotas, k)
    assert [sorted(torch.nonzero(m).flatten().tolist()) for m in got] == expected


@HYP
@given(quota_case())
def test_allocate_with_quotas_matches_water_filling(case):
    layers, quotas, k = case
    tensors = [as_tensor(v) for v in layers]
    got = allocate([lambda t=t: t for t in tensors], quotas, k, [f"l{i}" for i in range(len(layers))])
    check_allocation(layers, quotas, k, got)


@HYP
@given(quota_case())
def test_allocate_chunked_matches_water_filling(case):
    layers, quotas, k = case
    tensors = [as_tensor(v) for v in layers]
    with pytest.MonkeyPatch.context() as mp:
        kw = chunked(mp)
        got = allocate([lambda t=t: t for t in tensors], quotas, k, None, **kw)
    check_allocation(layers, quotas, k, got)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 400), st.data())
def test_allocate_random_large_layers_vs_sort(n_layers, size, data):
    """Bigger random inputs (continuous scores), with and without quotas."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    tensors = [torch.rand(size + i * 13, generator=gen) * 10 ** (i - 2) for i in range(n_layers)]
    layers = [t.tolist() for t in tensors]
    quotas = [Quota(t.numel(), t.numel() // 5, (4 * t.numel()) // 5) for t in tensors]
    k = data.draw(st.integers(0, sum(t.numel() for t in tensors)))
    got = allocate([lambda t=t: t for t in tensors], quotas, k)
    check_allocation(layers, quotas, k, got)


def test_allocate_ties_across_layers_go_to_earlier_layers():
    a, b = torch.zeros(4), torch.full((4,), -0.0)
    got = allocate([lambda: a, lambda: b], [Quota(4), Quota(4)], 6)
    assert [m.tolist() for m in got] == [[True] * 4, [True, True, False, False]]
    got = allocate([lambda: a, lambda: b], [Quota(4, hi=3), Quota(4)], 6)
    assert [m.tolist() for m in got] == [[True, True, True, False], [True, True, True, False]]


def test_allocate_floor_and_cap_example():
    """Layer a has all the low scores; a cap of 2 and b's floor of 3 move zeros to b, total stays k."""
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    b = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    got = allocate([lambda: a, lambda: b], [Quota(5, 0, 2), Quota(5, 3, 5)], 5)
    assert got[0].tolist() == [True, True, False, False, False]
    assert got[1].tolist() == [False, False, True, True, True]
    # unreachable totals: caps win above, floors win below
    got = allocate([lambda: a, lambda: b], [Quota(5, 0, 2), Quota(5, 0, 1)], 9)
    assert [int(m.sum()) for m in got] == [2, 1]
    got = allocate([lambda: a, lambda: b], [Quota(5, 2, 5), Quota(5, 2, 5)], 1)
    assert [int(m.sum()) for m in got] == [2, 2] and got[1].tolist() == [False, False, False, True, True]
