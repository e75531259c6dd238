"""``prunekit-glue --auto_slim``: prune FFN channels and heads, cut them out, report latency, reload the result."""
import json

import pytest
import torch

from prunekit.cli import glue_main
from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir() or not shared_model_dir().is_dir(),
                                reason="shared data / model not found")


def _flags(model, out, *extra):
    return ["--model_name_or_path", str(model), "--task_name", "sst2", "--data_dir", str(DATA),
            "--max_train_samples", "128", "--max_eval_samples", "64", "--max_length", "32",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
            "--num_train_epochs", "2", "--output_dir", str(out), "--num_threads", "1", "--disable_tqdm",
            "--learning_rate", "1e-3", *extra]


def _base_checkpoint(folder):
    """A tiny *base* BERT (``architectures: [BertModel]``), as real starting checkpoints often are: the recipe
    adds the classifier, and its slimmed output must still load back as the classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = make_tiny_bert(folder / "classifier")
    AutoModelForSequenceClassification.from_pretrained(classifier).bert.save_pretrained(folder / "base")
    AutoTokenizer.from_pretrained(classifier).save_pretrained(folder / "base")
    return folder / "base"


def test_auto_slim_prunes_slims_and_reports_latency(tmp_path):
    tiny = _base_checkpoint(tmp_path)
    out = tmp_path / "slim"
    rc = glue_main(_flags(tiny, out, "--do_prune", "--auto_slim", "--ffn2_sparsity", "0.5", "--mha_sparsity",
                          "0.5", "--pruning_frequency", "2", "--cooldown_epochs", "0.5"))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    slim = metrics["slim"]
    assert slim["params_after"] < slim["params_before"]
    assert slim["latency_before_s"] > 0 and slim["latency_after_s"] > 0 and slim["speedup"] > 0
    # slimming removes only zeros: the metric of the slimmed model equals the masked model's
    assert slim["final_after_slim"]["accuracy"] == pytest.approx(metrics["final"]["accuracy"], abs=1e-9)

    from prunekit.slimming import load_slimmed

    model = load_slimmed(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    config = json.loads((tiny / "config.json").read_text())
    widths = [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer]
    assert sum(widths) == round(0.5 * config["intermediate_size"] * config["num_hidden_layers"])
    assert (out / "pruning_state.pt").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--auto_slim"], "--do_prune"),
    (["--do_prune", "--auto_slim", "--pruning_pattern", "4x1"], "--pruning_pattern"),
    (["--do_prune", "--auto_slim", "--mha_sparsity", "1.0"], "--mha_sparsity"),
])
def test_auto_slim_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    rc = glue_main(_flags(tmp_path / "missing-model", out, *extra))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
