"""examples/digits_cnn.py, the README's main job (issue 13, item 17): it shows progress while it trains, keeps its
final report, and never overwrites earlier results unless told to."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.py"


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the example needs the 'examples' extra (scikit-learn)")
    spec = importlib.util.spec_from_file_location("digits_cnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_shows_a_progress_bar_per_epoch_and_keeps_its_report(digits, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = digits.main(["--quick", "--out", str(out)])
    captured = capsys.readouterr()
    bars = captured.err.replace("\r", "\n")
    for epoch in ("dense 1/1", "prune 1/4", "prune 4/4"):
        assert epoch in bars, f"no progress bar for {epoch!r}:\n{bars[-2000:]}"
    final = [line for line in bars.splitlines() if line.startswith("prune 4/4") and "10/10" in line]
    assert final, bars[-2000:]
    assert "step/s" in final[-1] and "loss=" in final[-1] and "sparsity=90.0%" in final[-1]
    assert "<00:00" in final[-1]  # elapsed<remaining: the ETA
    # the final report is still printed, on stdout
    assert "dense accuracy" in captured.out and "pruned accuracy" in captured.out
    assert "pruned layers:" in captured.out
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert {p.name for p in out.iterdir()} == {"report.json", "metrics.json", "checkpoint.pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_no_progress_is_silent_on_stderr(digits, tmp_path, capsys):
    digits.main(["--quick", "--no-progress", "--out", str(tmp_path / "run")])
    assert "step/s" not in capsys.readouterr().err


def test_earlier_results_are_refused_before_training_unless_overwritten(digits, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{\"mine\": 1}")
    with pytest.raises(SystemExit) as info:
        digits.main(["--quick", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out: got" in err and "--overwrite" in err and "dense 1/1" not in err  # refused before training
    assert (out / "metrics.json").read_text() == "{\"mine\": 1}"
    digits.main(["--quick", "--no-progress", "--overwrite", "--out", str(out)])
    assert "pruned_accuracy" in json.loads((out / "metrics.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("argv, key", [(["--prune-epochs", "1"], "--prune-epochs"),
                                       (["--train-samples", "3"], "--train-samples")])
def test_bad_arguments_are_one_line_errors(digits, tmp_path, capsys, argv, key):
    with pytest.raises(SystemExit):
        digits.main([*argv, "--out", str(tmp_path / "run")])
    assert f"error: {key}: got" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
