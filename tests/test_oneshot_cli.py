"""``prunekit oneshot``: a normal checkout out, the report printed and saved; bad input is one line, exit 2."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.cli import main
from llm_fixtures import tiny_checkpoint

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = tiny_checkpoint(root / "model", "llama", layers=2)
    txt = root / "calib.txt"
    txt.write_text(TEXT)
    jsonl = root / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": TEXT[i:i + 200]}) for i in range(0, 600, 200)))
    return {"src": src, "txt": txt, "jsonl": jsonl}


def _args(files, out, *extra):
    return ["oneshot", "--model", str(files["src"]), "--method", "magnitude", "--calibration", str(files["txt"]),
            "--nsamples", "2", "--seqlen", "32", "--seed", "0", "--output", str(out), "--quiet", *extra]


def test_prunes_to_a_loadable_checkout_with_report(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(_args(files, out, "--pattern", "2:4", "--sparsity", "0.5", "--eval-text", str(files["txt"]))) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "peak RSS" in printed and "wall time" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "2:4" and set(report["perplexity"]) == {"dense", "pruned"}
    assert (out / "report.png").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.up_proj.weight
    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all())


def test_config_file_and_flags_combine(files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: magnitude\ntarget_sparsity: 0.3\nexcluded_op_names: ['down_proj']\n")
    out = tmp_path / "out"
    assert main(_args(files, out, "--config", str(cfg), "--sparsity", "0.4", "--calibration", str(files["jsonl"]),
                      "--text-column", "body")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target_sparsity"] == 0.4 and report["config"]["excluded_op_names"] == ["down_proj"]
    assert not any("down_proj" in r["name"] for r in report["sparsity"]["layers"])


@pytest.mark.parametrize("extra, message", [
    (["--method", "sparse"], "method: got 'sparse'"),
    (["--pattern", "4x1"], "pattern: got '4x1'"),
    (["--sparsity", "1.2"], "target_sparsity: got 1.2"),
    (["--seqlen", "5000"], "calibration: got"),
    (["--text-column", "nope", "--calibration", "JSONL"], "text_column: got 'nope'"),
    (["--model", "MISSING"], "model: got"),
    (["--output", "EXISTING"], "output_dir: got"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(files, tmp_path, capsys, extra, message):
    (tmp_path / "existing").mkdir()
    subst = {"JSONL": str(files["jsonl"]), "MISSING": str(tmp_path / "no" / "model"),
             "EXISTING": str(tmp_path / "existing")}
    extra = [subst.get(e, e) for e in extra]
    assert main(_args(files, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit oneshot: error: ") and message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


@pytest.mark.parametrize("flag, expected", [([], None), (["--true-sequential"], True),
                                            (["--no-true-sequential"], False)])
def test_true_sequential_flag_reaches_the_config(flag, expected):
    from prunekit.oneshot.cli import config_from_args, oneshot_parser

    args = oneshot_parser().parse_args(["--model", "m", "--calibration", "c", "--output", "o", *flag])
    assert config_from_args(args).true_sequential is expected
