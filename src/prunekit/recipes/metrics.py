"""Metrics computed locally (no ``evaluate``, which fetches its metric scripts from the hub).

* GLUE: accuracy, binary F1 (positive class 1), Matthews correlation, Pearson / Spearman; values in [0, 1] like
  the GLUE leaderboard's scikit-learn / scipy metrics.
* SQuAD v1.1: exact match and F1 by the rules of the official ``evaluate-v1.1.py`` (answer normalisation: lower
  case, drop punctuation, drop the articles a/an/the, collapse white space; the best score over the gold answers;
  averaged over questions), reported on its 0-100 scale.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------------
# GLUE


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def binary_f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    tp = sum(int(p) == positive and int(y) == positive for p, y in zip(preds, labels))
    fp = sum(int(p) == positive and int(y) != positive for p, y in zip(preds, labels))
    fn = sum(int(p) != positive and int(y) == positive for p, y in zip(preds, labels))
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def glue_metrics(task: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """The GLUE metrics of one task (``preds`` are class ids, or scores for stsb)."""
    task = task.lower()
    if task == "stsb":
        p, s = pearson(preds, labels), spearman(preds, labels)
        return {"pearson": p, "spearmanr": s, "combined_score": (p + s) / 2}
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(preds, labels)}
    out = {"accuracy": accuracy(preds, labels)}
    if task in {"mrpc", "qqp"}:
        out["f1"] = binary_f1(preds, labels)
        out["combined_score"] = (out["accuracy"] + out["f1"]) / 2
    return out


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v1.1 (official rules)


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra white space (official v1.1 normalisation)."""
    text = text.lower()
    exclude = set(string.punctuation)
    text = "".join(ch for ch in text if ch not in exclude)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _best(metric, prediction: str, ground_truths: Iterable[str]) -> float:
    return max(metric(prediction, gt) for gt in ground_truths)


def squad_evaluate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]] | Iterable[dict],
                   ) -> dict[str, float]:
    """Exact match and F1 (0-100) of ``{question id: predicted text}`` against the gold answers.

    ``references`` is ``{id: [gold answer texts]}`` or SQuAD examples (``{"id", "answers": {"text": [...]}}``).
    As in the official script, a question without a prediction counts 0 for both metrics.
    """
    if not isinstance(references, Mapping):
        references = {ex["id"]: list(ex["answers"]["text"]) for ex in references}
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            continue
        golds = list(golds) or [""]
        em += _best(squad_exact_match, predictions[qid], golds)
        f1 += _best(squad_f1, predictions[qid], golds)
    total = len(references)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}
