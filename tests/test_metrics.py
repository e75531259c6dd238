"""Local GLUE and SQuAD v1.1 metrics against hand-checked cases."""
import math

import pytest

from prunekit.recipes.metrics import (
    accuracy, binary_f1, glue_metrics, matthews_corrcoef, normalize_answer, pearson, spearman, squad_evaluate,
    squad_exact_match, squad_f1,
)


# --- SQuAD v1.1 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("  an   apple  ", "apple"),
    ("U.S. Army", "us army"),
    ("theater", "theater"),  # 'the' only as a whole word
    ("A-B c", "ab c"),
    ("The  Denver\tBroncos", "denver broncos"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_cases():
    assert squad_exact_match("An apple.", "apple") == 1.0
    assert squad_exact_match("Denver Broncos", "denver broncos!") == 1.0
    assert squad_exact_match("in 1990", "1990") == 0.0
    assert squad_exact_match("", "") == 1.0


def test_f1_cases():
    # pred {cat, sat}; gold {cat, sat, on, mat}: P = 1, R = 1/2 -> F1 = 2/3
    assert squad_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # no overlap
    assert squad_f1("dog", "cat") == 0.0
    # repeated tokens count with multiplicity: pred [a1, a1, b]; gold [a1, b, b]; common {a1:1, b:1} = 2
    assert squad_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # empty prediction scores 0 against a non-empty answer
    assert squad_f1("", "cat") == 0.0


def test_squad_evaluate_best_over_gold_answers_and_scale():
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990", "the year 1990"]}
    preds = {"q1": "Denver Broncos", "q2": "in 1990"}
    out = squad_evaluate(preds, refs)
    # q1: EM 1, F1 1. q2: EM 0; F1 max(2/3 vs '1990', 1/2 vs 'year 1990') = 2/3
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_squad_evaluate_missing_prediction_counts_zero_and_examples_form():
    examples = [{"id": "a", "answers": {"text": ["Paris"], "answer_start": [0]}},
                {"id": "b", "answers": {"text": ["blue", "dark blue"], "answer_start": [3, 0]}}]
    out = squad_evaluate({"a": "paris"}, examples)
    assert out == {"exact_match": 50.0, "f1": 50.0}
    assert squad_evaluate({}, {}) == {"exact_match": 0.0, "f1": 0.0}


# --- GLUE -------------------------------------------------------------------------------------------------------

def test_accuracy_and_f1():
    preds, labels = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # tp=2 fp=1 fn=1 -> P=R=2/3 -> F1=2/3
    assert binary_f1(preds, labels) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])


def test_matthews():
    # tp=2 tn=2 fp=1 fn=1 -> (4-1)/sqrt(3*3*3*3) = 1/3
    preds, labels = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]
    assert matthews_corrcoef(preds, labels) == pytest.approx(1 / 3)
    assert matthews_corrcoef([1, 1], [1, 1]) == 0.0  # degenerate: defined as 0


def test_pearson_spearman():
    x = [1.0, 2.0, 3.0, 4.0]
    assert pearson(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert pearson(x, [8.0, 6.0, 4.0, 2.0]) == pytest.approx(-1.0)
    assert spearman(x, [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    # ties get mean ranks: ranks y = [1.5, 1.5, 3, 4]
    expected = pearson([1, 2, 3, 4], [1.5, 1.5, 3, 4])
    assert spearman(x, [5.0, 5.0, 7.0, 9.0]) == pytest.approx(expected)


def test_glue_metrics_per_task():
    assert set(glue_metrics("sst2", [1, 0], [1, 1])) == {"accuracy"}
    m = glue_metrics("mrpc", [1, 0, 1], [1, 0, 0])
    assert set(m) == {"accuracy", "f1", "combined_score"}
    assert m["f1"] == pytest.approx(2 / 3)
    assert "matthews_correlation" in glue_metrics("cola", [1, 0], [1, 0])
    s = glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 3.5])
    assert math.isclose(s["spearmanr"], 1.0)
