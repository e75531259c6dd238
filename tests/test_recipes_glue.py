"""Short real GLUE recipes on slices of the shared data with a tiny BERT (real tokenizer, random weights)."""
import json

import pytest
import torch

from prunekit.cli import glue_main, main
from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir() or not shared_model_dir().is_dir(),
                                reason="shared data / model not found")


def _flags(model, out, *extra, train=256, eval_=128, epochs=2):
    return ["--model_name_or_path", str(model), "--task_name", "sst2", "--data_dir", str(DATA),
            "--max_train_samples", str(train), "--max_eval_samples", str(eval_), "--max_length", "64",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
            "--num_train_epochs", str(epochs), "--output_dir", str(out), "--num_threads", "1", "--disable_tqdm",
            *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def dense_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    rc = glue_main(_flags(tiny, out, "--learning_rate", "3e-3", train=512, epochs=4))
    assert rc == 0
    return out


def test_dense_fine_tune_learns_and_writes_outputs(dense_run):
    metrics = json.loads((dense_run / "metrics.json").read_text())
    assert metrics["mode"] == "dense" and metrics["distillation"] is None
    assert metrics["sparsity"]["pruned_layers"] == 0.0
    assert metrics["final_metric"] == metrics["final"]["accuracy"] == metrics["dense_metric"]
    history = json.loads((dense_run / "history.json").read_text())
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert last < first  # it trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "sparsity_report.json", "sparsity_report.png",
                 "train.log", "run_args.json"):
        assert (dense_run / name).is_file(), name
    assert not (dense_run / "pruning_state.pt").exists()
    assert "final accuracy=" in (dense_run / "train.log").read_text()


def test_prune_with_distillation_reaches_target_and_reloads(dense_run, tmp_path):
    out = tmp_path / "prune"
    rc = glue_main(_flags(dense_run, out, "--do_prune", "--target_sparsity", "0.9", "--pruning_pattern", "4x1",
                          "--pruning_frequency", "2", "--sparsity_warm_epochs", "1", "--cooldown_epochs", "1",
                          "--distill_loss_weight", "5", "--learning_rate", "1e-3", epochs=3))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "prune"
    assert metrics["distillation"]["loss"] == "hidden_mse" and metrics["distillation"]["weight"] == 5.0
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.9, abs=0.01)
    assert metrics["dense"] is not None and metrics["relative_change"] is not None
    steps = metrics["steps"]
    assert (steps["start_step"], steps["end_step"], steps["total_steps"]) == (16, 32, 48)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report and (out / "pruning_state.pt").is_file()
    state = torch.load(out / "pruning_state.pt", weights_only=True)
    assert state["global_step"] == 48

    # plain transformers loads the output; predictions match the recipe's own final evaluation
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunekit.recipes.data import load_glue
    from prunekit.recipes.metrics import glue_metrics

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    val = load_glue("sst2", DATA)["validation"][:128]
    enc = tok([e["text_a"] for e in val], truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1).tolist()
    assert glue_metrics("sst2", preds, [e["label"] for e in val]) == metrics["final"]
    # the zeros are in the saved weights themselves
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert (w == 0).float().mean().item() > 0.5
    assert (model.classifier.weight != 0).all()  # the head is never pruned


def test_subcommand_form_and_logit_kl(dense_run, tmp_path):
    out = tmp_path / "kl"
    rc = main(["glue", *_flags(dense_run, out, "--do_prune", "--target_sparsity", "0.5", "--pruning_pattern", "2:4",
                               "--distill_loss_weight", "2", "--distill_loss", "logit_kl", "--learning_rate",
                               "1e-3", train=128, epochs=1)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["loss"] == "logit_kl"
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=1e-6)


def test_pruning_config_yaml_fills_steps_from_epochs(dense_run, tmp_path):
    cfg = tmp_path / "prune.yaml"
    cfg.write_text("pruning_configs:\n  - pruning_type: magnitude\n    pattern: 1x1\n    target_sparsity: 0.7\n"
                   "    excluded_op_names: [classifier, pooler]\n", encoding="utf-8")
    out = tmp_path / "yaml"
    rc = glue_main(_flags(dense_run, out, "--do_prune", "--pruning_config", str(cfg), "--learning_rate", "1e-4",
                          train=128, epochs=2))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.7, abs=0.01)
    run_args = json.loads((out / "run_args.json").read_text())
    pruner = run_args["pruning_config"]["pruning_configs"][0]
    assert pruner["pruning_type"] == "magnitude" and pruner["end_step"] == run_args["plan"]["end_step"]


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------

def _one_line_error(capsys, rc):
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture()
def previous_run(tmp_path):
    out = tmp_path / "previous"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    return out


def test_bad_inputs(tiny, previous_run, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    base = _flags(tiny, fresh)

    def swap(flag, value):
        flags = list(base)
        flags[flags.index(flag) + 1] = value
        return flags

    err = _one_line_error(capsys, glue_main(swap("--task_name", "sst3")))
    assert "--task_name" in err and "sst2" in err
    err = _one_line_error(capsys, glue_main(swap("--data_dir", str(tmp_path / "missing"))))
    assert "missing" in err
    err = _one_line_error(capsys, glue_main(swap("--model_name_or_path", str(tmp_path / "no_model"))))
    assert "no_model" in err
    err = _one_line_error(capsys, glue_main(base + ["--do_prune", "--pruning_config", str(tmp_path / "x.yaml")]))
    assert "x.yaml" in err
    err = _one_line_error(capsys, glue_main(base + ["--do_prune", "--pruning_pattern", "2:4", "--target_sparsity",
                                                    "0.9"]))
    assert "target_sparsity" in err and "2:4" in err
    err = _one_line_error(capsys, glue_main(base + ["--do_prune", "--pruning_pattern", "4y1"]))
    assert "pattern" in err
    err = _one_line_error(capsys, glue_main(base + ["--do_prune", "--sparsity_warm_epochs", "2",
                                                    "--cooldown_epochs", "1"]))
    assert "--cooldown_epochs" in err
    assert not fresh.exists()  # nothing written for any of them

    err = _one_line_error(capsys, glue_main(swap("--output_dir", str(previous_run))))
    assert "--overwrite_output_dir" in err
    assert sorted(p.name for p in previous_run.iterdir()) == ["metrics.json"]
    assert json.loads((previous_run / "metrics.json").read_text()) == {"old": True}


def test_offline_without_data_dir(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PRUNEKIT_DATA_DIR", raising=False)
    flags = _flags(tiny, tmp_path / "out")
    i = flags.index("--data_dir")
    del flags[i: i + 2]
    err = _one_line_error(capsys, glue_main(flags))
    assert "--data_dir" in err and "PRUNEKIT_DATA_DIR" in err
    assert not (tmp_path / "out").exists()


def test_overwrite_output_dir_replaces_previous_run(tiny, previous_run):
    rc = glue_main(_flags(tiny, previous_run, "--overwrite_output_dir", train=32, eval_=16, epochs=1))
    assert rc == 0
    assert "old" not in json.loads((previous_run / "metrics.json").read_text())
