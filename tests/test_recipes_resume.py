"""``--checkpointing_steps`` / ``--resume_from_checkpoint``: a recipe run interrupted and resumed ends bit-identical
to the same run done in one go (weights, masks, scores, loss history)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunekit.recipes.checkpoint as ckpt_mod
from prunekit.cli import glue_main
from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

torch.set_num_threads(1)
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir() or not shared_model_dir().is_dir(),
                                reason="shared data / model not found")


def flags(model, out, *extra):
    # 80 examples / 16 = 5 steps per epoch (the shuffler's pass ends exactly on a batch), 2 epochs = 10 steps;
    # dropout is on (the tiny BERT keeps the real config's 0.1), pruning runs from step 2 to 8 every 2 steps
    return ["--model_name_or_path", str(model), "--task_name", "sst2", "--data_dir", str(DATA),
            "--max_train_samples", "80", "--max_eval_samples", "16", "--max_length", "24",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--num_train_epochs", "2",
            "--learning_rate", "2e-3", "--do_prune", "--target_sparsity", "0.75", "--pruning_pattern", "4x1",
            "--pruning_frequency", "2", "--sparsity_warm_epochs", "0.4", "--cooldown_epochs", "0.4",
            "--lr_scheduler_type", "linear", "--num_warmup_steps", "2", "--output_dir", str(out),
            "--num_threads", "1", "--disable_tqdm", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_tree(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"
    sa = torch.load(a / "pruning_state.pt", weights_only=True)
    sb = torch.load(b / "pruning_state.pt", weights_only=True)
    assert sa["global_step"] == sb["global_step"] == 10
    for pa, pb in zip(sa["pruners"], sb["pruners"]):
        for layer in pa["masks"]:
            assert torch.equal(pa["masks"][layer], pb["masks"][layer]), f"mask of {layer} differs"
        assert_same_tree(pa["criterion"], pb["criterion"], "criterion")  # the scores
        assert [e[:3] for e in pa["history"]] == [e[:3] for e in pb["history"]]  # (step, target, sparsity)
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["final"] == mb["final"] and ma["dense"] == mb["dense"]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert glue_main(flags(tiny, out, "--checkpointing_steps", "3")) == 0
    return out


def test_checkpoints_are_written_complete(straight):
    assert [p.name for p in ckpt_mod.checkpoint_dirs(straight)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    ckpt = straight / "checkpoint-6"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["model.safetensors", "optimizer.pt", "pruning_state.pt", "rng_state_0.pt", "scheduler.pt",
                     "trainer_state.json"]
    for name in ("optimizer.pt", "pruning_state.pt", "rng_state_0.pt", "scheduler.pt"):
        torch.load(ckpt / name, weights_only=True)  # plain data: nothing to unpickle
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done"]) == (6, 1, 1)  # mid-epoch 2
    assert not list(straight.glob(".checkpoint-*"))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["checkpoints"] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.75, abs=0.01)


def _interrupt_at(monkeypatch, step: int, *, midway: bool) -> None:
    """Stop the run as a crash would when the checkpoint of ``step`` is due: before writing it, or halfway
    through writing it (some files in the temporary folder, no state file)."""
    real_save = ckpt_mod.save

    def save(out_dir, pos, *args, **kwargs):
        if pos.step == step:
            if midway:
                tmp = out_dir / f".checkpoint-{step}.tmp"
                tmp.mkdir()
                (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return real_save(out_dir, pos, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save", save)


@pytest.mark.parametrize("every,stop,midway,resumes_at", [
    ("3", 9, True, 6),  # resumes mid-epoch (batch 1 of epoch 2 done), redoes steps 7-9
    ("epoch", 10, False, 5),  # resumes at an epoch's end, redoes the whole second epoch
], ids=["steps-mid-epoch", "epoch-end"])
def test_interrupted_then_resumed_is_bit_identical(tiny, straight, tmp_path, monkeypatch, every, stop, midway,
                                                    resumes_at):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, stop, midway=midway)
        assert glue_main(flags(tiny, out, "--checkpointing_steps", every)) == 130
    assert not (out / "metrics.json").exists()
    assert ckpt_mod.checkpoint_dirs(out)[-1].name == f"checkpoint-{resumes_at}"

    # a plain rerun is refused and points at the resume flag
    assert glue_main(flags(tiny, out, "--checkpointing_steps", every)) == 2

    assert glue_main(flags(tiny, out, "--checkpointing_steps", every, "--resume_from_checkpoint", "latest")) == 0
    assert_identical(straight, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"]["step"] == resumes_at
    assert not list(out.glob(".checkpoint-*"))  # the half-written folder was replaced by the complete one
    log = (out / "train.log").read_text()
    assert "resuming from" in log and "step 3/10" in log  # the interrupted run's log is kept


def test_resume_refuses_another_run_and_planted_files(tiny, straight, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(straight / "checkpoint-6", ckpt)
    out = tmp_path / "out"

    def one_line(argv) -> str:
        assert glue_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err, err
        assert not out.exists()
        return err

    err = one_line(flags(tiny, out, "--resume_from_checkpoint", str(ckpt), "--learning_rate", "1e-3"))
    assert "different run" in err and "--learning_rate" in err and "0.002" in err
    err = one_line(flags(tiny, out, "--resume_from_checkpoint", str(ckpt), "--max_train_samples", "64"))
    assert "different run" in err
    err = one_line(flags(tiny, out, "--resume_from_checkpoint", "latest"))
    assert "no complete checkpoint" in err
    err = one_line(flags(tiny, out, "--checkpointing_steps", "0"))
    assert "--checkpointing_steps" in err and "'epoch'" in err

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(tmp_path / 'marker')!r}, 'w').write('x')",)

    torch.save({"state": {}, "param_groups": [], "x": Payload()}, ckpt / "optimizer.pt")
    err = one_line(flags(tiny, out, "--resume_from_checkpoint", str(ckpt)))
    assert "optimizer.pt" in err and "refused" in err
    assert not (tmp_path / "marker").exists()
    (ckpt / "trainer_state.json").unlink()
    err = one_line(flags(tiny, out, "--resume_from_checkpoint", str(ckpt)))
    assert "trainer_state.json" in err and "not a complete" in err
