"""Bad input to the recipes: ONE line naming the input, the value and what is allowed, exit status 2, no
traceback, and nothing created (the output folder does not exist afterwards)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.cli import glue_main, squad_main
from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir() or not shared_model_dir().is_dir(),
                                reason="shared data / model not found")
GOOD_ROWS = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(["a fine film", "dull", "great fun", "a mess"] * 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def glue_data(root: Path, train: bytes | str, dev: bytes | str | None = None) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, content in (("train.tsv", train), ("dev.tsv", dev if dev is not None else "sentence\tlabel\n"
                                                                                           + GOOD_ROWS)):
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def flags(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--task_name", "sst2", "--data_dir", str(data),
            "--max_length", "16", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
            "--output_dir", str(out), "--num_threads", "1", "--disable_tqdm", *extra]


def one_line(capsys, rc) -> str:
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case,train,expect", [
    ("latin-1", "sentence\tlabel\ncaf\xe9 au lait\t1\n".encode("latin-1") + GOOD_ROWS.encode(),
     ["train.tsv", "not UTF-8", "0xe9", "line 2"]),
    ("binary", bytes(range(256)) * 4, ["train.tsv", "binary", "UTF-8"]),
    ("header-only", "sentence\tlabel\n", ["train.tsv", "no examples", "only a header"]),
    ("label-7", "sentence\tlabel\n" + GOOD_ROWS + "an odd one\t7\n", ["train.tsv:18", "'7'", "[0, 1]"]),
    ("label-text", "sentence\tlabel\n" + GOOD_ROWS + "an odd one\tpositive\n", ["train.tsv:18", "'positive'"]),
])
def test_bad_glue_tsv(tiny, tmp_path, capsys, case, train, expect):
    data = glue_data(tmp_path / "data", train)
    out = tmp_path / "out"
    err = one_line(capsys, glue_main(flags(tiny, data, out)))
    for part in expect:
        assert part in err, (part, err)
    assert not out.exists()


def test_bad_label_in_dev_file(tiny, tmp_path, capsys):
    data = glue_data(tmp_path / "data", "sentence\tlabel\n" + GOOD_ROWS, "sentence\tlabel\nfine\t0\nodd\t-1\n")
    out = tmp_path / "out"
    err = one_line(capsys, glue_main(flags(tiny, data, out)))
    assert "dev.tsv:3" in err and "'-1'" in err and "[0, 1]" in err
    assert not out.exists()


def test_output_dir_under_a_file(tiny, tmp_path, capsys):
    data = glue_data(tmp_path / "data", "sentence\tlabel\n" + GOOD_ROWS)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    err = one_line(capsys, glue_main(flags(tiny, data, blocker / "run" / "deeper")))
    assert "--output_dir" in err and "a-file" in err and "is a file" in err
    assert blocker.read_text() == "keep me"


def test_bad_squad_json(tiny, tmp_path, capsys):
    bad = tmp_path / "dev.json"
    bad.write_bytes(b'{"data": [{"title": "caf\xe9"}]}')
    out = tmp_path / "out"
    err = one_line(capsys, squad_main(["--model_name_or_path", str(tiny), "--validation_file", str(bad),
                                       "--dev_derived_split", "--output_dir", str(out), "--disable_tqdm"]))
    assert "dev.json" in err and "not UTF-8" in err
    bad.write_text('{"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}')
    err = one_line(capsys, squad_main(["--model_name_or_path", str(tiny), "--validation_file", str(bad),
                                       "--dev_derived_split", "--output_dir", str(out), "--disable_tqdm"]))
    assert "dev.json" in err and "'qas'" in err and "SQuAD v1.1" in err
    assert not out.exists()


def test_without_the_recipes_extra(tmp_path):
    """transformers missing (simulated by an import blocker): one line that names the extra to install."""
    out = tmp_path / "out"
    script = ("import sys; sys.modules['transformers'] = None\n"  # `import transformers` now fails as if missing
              "from prunekit.cli import glue_main\n"
              f"sys.exit(glue_main(['--model_name_or_path', 'x', '--task_name', 'sst2', '--output_dir', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PRUNEKIT_DEBUG": ""})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "transformers" in err and 'pip install "prunekit[recipes]"' in err
    assert not out.exists()


def _digest(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_dir_never_overlaps_the_model_it_reads(tmp_path, capsys, where):
    """``--model_name_or_path runs/m --output_dir runs/m --overwrite_output_dir`` deleted the model's config.json
    and model.safetensors before training. The real small BERT is copied, then must come out untouched."""
    import shutil

    model = tmp_path / "runs" / "m"
    shutil.copytree(shared_model_dir(), model)
    before = _digest(model)
    out = {"same": model, "inside": model / "pruned", "contains": tmp_path / "runs"}[where]
    err = one_line(capsys, glue_main(flags(model, DATA, out, "--overwrite_output_dir", "--do_prune",
                                           "--max_train_samples", "8", "--max_eval_samples", "8")))
    assert "--output_dir" in err and "--model_name_or_path" in err and str(model) in err
    assert _digest(model) == before
    assert not (model / "pruned").exists()


def test_output_dir_never_overlaps_the_data_it_reads(tiny, tmp_path, capsys):
    data = glue_data(tmp_path / "data", "sentence\tlabel\n" + GOOD_ROWS)
    before = _digest(data)
    err = one_line(capsys, glue_main(flags(tiny, data, data / "SST-2", "--overwrite_output_dir")))
    assert "--data_dir" in err and "contains" not in err
    assert _digest(data) == before
