"""SQuAD v1.1 recipe: feature windows and answer alignment, post-processing, short real runs on the dev-derived split."""
import json

import numpy as np
import pytest
import torch

from prunekit.cli import squad_main
from prunekit.recipes.squad import postprocess_predictions, prepare_eval_features, prepare_train_features
from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "squad" / "dev-v1.1.json").is_file() or not shared_model_dir().is_dir(),
                                reason="shared data / model not found")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_model_dir())


EXAMPLE = {
    "id": "x1", "title": "t", "question": "Who won the game?",
    "context": "After a long season the Denver Broncos won the game against the Carolina Panthers in 2016.",
    "answers": {"text": ["Denver Broncos"], "answer_start": [24]},
}


def test_train_features_point_at_the_answer(tokenizer):
    ctx = EXAMPLE["context"]
    assert ctx[24:24 + len("Denver Broncos")] == "Denver Broncos"
    # a window so small that the context is split: one window holds the answer, the others point at CLS
    feats = prepare_train_features([EXAMPLE], tokenizer, max_seq_length=20, doc_stride=4)
    assert len(feats) > 1
    hits = [f for f in feats if f["start_positions"] != 0]
    assert hits
    for f in hits:
        span = tokenizer.decode(f["input_ids"][f["start_positions"]: f["end_positions"] + 1])
        assert span == "denver broncos"


def test_postprocess_picks_best_valid_span(tokenizer):
    feats, meta = prepare_eval_features([EXAMPLE], tokenizer, max_seq_length=64, doc_stride=16)
    assert len(feats) == 1
    n = len(feats[0]["input_ids"])
    offsets = meta[0]["offset_mapping"]
    start = next(i for i, o in enumerate(offsets) if o is not None and o[0] == 24)
    end = start + 1
    s, e = np.zeros(n), np.zeros(n)
    s[start], e[end] = 5.0, 5.0
    s[0], e[0] = 9.0, 9.0  # the CLS token outside the context must never be chosen
    e[start - 1] = 7.0  # an end before the start is invalid
    preds = postprocess_predictions([EXAMPLE], meta, [s], [e])
    assert preds == {"x1": "Denver Broncos"}


def _flags(model, out, *extra):
    return ["--model_name_or_path", str(model), "--data_dir", str(DATA), "--dev_derived_split",
            "--max_train_samples", "48", "--max_eval_samples", "24", "--max_seq_length", "128", "--doc_stride",
            "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
            "--learning_rate", "1e-3", "--output_dir", str(out), "--num_threads", "1", "--disable_tqdm", *extra]


def test_squad_dense_then_prune_with_kl_distillation(tmp_path):
    tiny = make_tiny_bert(tmp_path / "tiny")
    dense = tmp_path / "dense"
    assert squad_main(_flags(tiny, dense, "--num_train_epochs", "1")) == 0
    m = json.loads((dense / "metrics.json").read_text())
    assert m["task"] == "squad-dev-derived" and m["primary_metric"] == "f1"
    assert set(m["final"]) == {"exact_match", "f1"} and 0.0 <= m["final"]["f1"] <= 100.0

    pruned = tmp_path / "pruned"
    rc = squad_main(_flags(dense, pruned, "--num_train_epochs", "2", "--do_prune", "--pruning_pattern", "2:4",
                           "--target_sparsity", "0.5", "--pruning_frequency", "2", "--num_warmup_steps", "2",
                           "--cooldown_epochs", "1", "--distill_loss_weight", "4.5"))
    assert rc == 0
    m = json.loads((pruned / "metrics.json").read_text())
    assert m["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=1e-6)
    assert m["distillation"]["loss"] == "start/end KL" and m["distillation"]["temperature"] == 2.0
    assert m["steps"]["start_step"] == 2  # --num_warmup_steps also delays pruning, as the original QA script

    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(pruned)
    assert (model.qa_outputs.weight != 0).all()
    w = model.bert.encoder.layer[1].output.dense.weight.view(-1, 4)
    assert ((w == 0).sum(-1) >= 2).all()  # 2:4 holds in the saved weights
