"""round_to keeps widths a multiple of it, deterministically, keeping the highest-scoring channels."""
from __future__ import annotations

import torch

from prunekit.slimming import detect, slim
from test_slim_fixtures import FAMILIES, FFN, inputs_for, outputs, zero_channels


def _zeroed(channels: list[int]):
    model = FAMILIES["bert"]()
    found = detect(model)
    zero_channels(model, found.ffn[0], channels)
    return model, found


def test_width_is_rounded_up_to_a_multiple() -> None:
    model, _ = _zeroed(list(range(30)))  # 18 live channels -> 24 with round_to=8
    x = inputs_for("bert")
    expected = outputs(model, x)
    report = slim(model, round_to=8)
    assert report.ffn[0].width_after == 24
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 24
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)
    kept = [s for s in report.not_cut if s.kind == "ffn"]
    assert len(kept) == 1 and len(kept[0].indices) == 6 and "round_to=8" in kept[0].reason


def test_rounding_is_deterministic() -> None:
    removed = []
    for _ in range(2):
        model, _ = _zeroed(list(range(1, 40, 2)))
        removed.append(slim(model, round_to=16).ffn[0].removed)
    assert removed[0] == removed[1]


def test_highest_scoring_zero_channels_are_kept() -> None:
    zero = list(range(30))
    model, found = _zeroed(zero)
    scores = torch.zeros(FFN)
    scores[[3, 11, 17, 22, 25, 29]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    report = slim(model, round_to=8, scores={found.ffn[0].consumer: scores})
    kept_zero = sorted(set(zero) - set(report.ffn[0].removed))
    assert kept_zero == [3, 11, 17, 22, 25, 29]


def test_default_score_is_the_weight_norm() -> None:
    model, found = _zeroed(list(range(30)))
    producer = model.get_submodule(found.ffn[0].producers[0])
    with torch.no_grad():
        producer.weight[:30] *= 0.01
        producer.weight[[4, 9]] *= 1000.0   # the two largest zero channels by norm
    report = slim(model, round_to=10)        # 18 live -> 20: two zero channels stay
    assert sorted(set(range(30)) - set(report.ffn[0].removed)) == [4, 9]


def test_width_that_cannot_be_rounded_is_reported() -> None:
    model, _ = _zeroed(list(range(10)))    # 38 live channels, round_to=32 -> 64 > 48
    report = slim(model, round_to=32)
    assert report.ffn == []
    assert any("cannot be cut to a multiple" in s.reason for s in report.not_cut)
