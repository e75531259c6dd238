"""``prunekit distill``: recovery of a slimmed decoder LLM from its dense teacher (tiny random Llamas, real
character-level tokenizer, real text files)."""
from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from llm_fixtures import tiny_llm
from prunekit.cli import main
from prunekit.recipes.distill import causal_lm_distill_loss, uniform_layer_map
from prunekit.recipes.llm_distill import CHECKPOINT_DIR, DistillConfig, run_distill

SENTENCES = ["the quick brown fox jumps over the lazy dog.", "pruning removes channels; distillation recovers them.",
             "a small model learns the distribution of a large one.", "tokens per second and the running loss."]


def _text(n: int = 60, offset: int = 0) -> str:
    return " ".join(SENTENCES[(i + offset) % len(SENTENCES)] for i in range(n))


def _tokenizer(corpus: str):
    """A character-level BPE tokenizer of at most 120 tokens (the tiny models have 128 embeddings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable[:95]), limit_alphabet=100)
    tok.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _slim_ffn(model, keep: list[int]) -> None:
    """Zero the lowest-norm FFN channels of each layer (``keep[i]`` stay) and remove them with prunekit.slim."""
    import prunekit

    with torch.no_grad():
        for layer, k in zip(model.model.layers, keep):
            mlp = layer.mlp
            norms = mlp.down_proj.weight.norm(dim=0) * (mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1))
            drop = norms.argsort()[: norms.numel() - k]
            mlp.down_proj.weight[:, drop] = 0
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
    prunekit.slim(model)


def _trained_teacher(tok, steps: int = 60):
    """A tiny Llama that has learnt the sentences (a random teacher's near-uniform distribution would make
    recovery trivially easy); deterministic."""
    torch.manual_seed(0)
    model = tiny_llm("llama", layers=2, seed=0)
    ids = torch.tensor(tok(_text(200), add_special_tokens=False)["input_ids"])
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = windows[(step * 8) % (windows.shape[0] - 8):][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher, a uniformly slimmed student, a per-layer-width student, train and eval text."""
    root = tmp_path_factory.mktemp("distill")
    tok = _tokenizer(_text(200))
    teacher = _trained_teacher(tok)
    dirs = {"root": root}
    for name, keep in (("student", [32, 32]), ("student_nonuniform", [64, 32])):
        student = copy.deepcopy(teacher)
        _slim_ffn(student, keep)
        import prunekit

        prunekit.save_slimmed(student, root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    dirs["teacher"] = root / "teacher"
    (root / "train.txt").write_text(_text(200), encoding="utf-8")
    with open(root / "eval.jsonl", "w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"text": _text(8, offset=i)}) + "\n")
    dirs["train"], dirs["eval"] = root / "train.txt", root / "eval.jsonl"
    return dirs


def _config(world, output, **kw) -> DistillConfig:
    base = dict(student=str(world["student"]), teacher=str(world["teacher"]), train_text=str(world["train"]),
                output=str(output), max_tokens=32 * 16, seqlen=32, batch_size=2, grad_accum=2, lr=3e-3,
                eval_text=str(world["eval"]), eval_windows=4, eval_every=2, checkpoint_every=0, progress=False,
                device="cpu")
    return DistillConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_loss_decreases_and_the_output_reloads_with_plain_transformers(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    metrics = run_distill(_config(world, out))
    losses = [h["loss"] for h in json.loads((out / "history.json").read_text())["train"]]
    assert len(losses) == 4  # 16 windows / (2 × 2) per step
    assert losses[-1] < 0.8 * losses[0]
    ppl = metrics["perplexity"]
    assert ppl["student_after"] < ppl["student_before"]
    assert ppl["student_before"] > 1.2 * ppl["teacher"]  # the student starts visibly worse than its teacher
    assert ppl["gap_closed"] > 0.25 and 0 < ppl["log_gap_closed"] < 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "history.json",
                 "distill.png", "run_args.json", "train.log"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT_DIR).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 32
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(world["teacher"]).get_vocab()
    from prunekit.oneshot import perplexity

    windows = torch.tensor(json.loads((out / "metrics.json").read_text())["perplexity"]["eval_windows"])
    assert windows.tolist() == [4, 32]
    ids = torch.randint(0, 120, (1, 16))
    trained = _weights(out)
    for name, value in reloaded.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name
    assert perplexity(reloaded, ids) > 0


def test_per_layer_widths_are_saved_for_load_slimmed(world, tmp_path):
    import prunekit

    out = tmp_path / "run"
    run_distill(_config(world, out, student=str(world["student_nonuniform"]), max_tokens=32 * 4, eval_text=None))
    model = prunekit.load_slimmed(out)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [64, 32]
    trained = _weights(out)
    for name, value in model.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(world, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_distill(_config(world, whole, checkpoint_every=1))
    parts = tmp_path / "parts"
    stopped = run_distill(_config(world, parts, stop_after_steps=1, windows="random"))
    assert stopped["stopped_at_step"] == 1
    assert not (parts / "model.safetensors").exists() and (parts / CHECKPOINT_DIR).is_dir()
    # a changed trajectory flag is refused
    with pytest.raises(Exception, match="windows"):
        run_distill(_config(world, parts, resume=True))
    # Ctrl-C in the middle of step 3 (its first micro-batch is done): the checkpoint holds step 2
    from prunekit.recipes import llm_distill

    calls, real = [], llm_distill.causal_lm_distill_loss

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(llm_distill, "causal_lm_distill_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        run_distill(_config(world, parts, resume=True, windows="random"))
    monkeypatch.setattr(llm_distill, "causal_lm_distill_loss", real)
    metrics = run_distill(_config(world, parts, resume=True, windows="random"))
    assert metrics["resumed_at_steps"] == [1, 2]
    reference = tmp_path / "reference"
    run_distill(_config(world, reference, windows="random"))
    a, b = _weights(reference), _weights(parts)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((d / "history.json").read_text()) for d in (reference, parts)]
    assert history[0] == history[1]
    # and the whole (consecutive windows) run differs from the random-window one: the comparison can fail
    assert not all(torch.equal(a[k], v) for k, v in _weights(whole).items())


def test_fewer_student_layers_match_teacher_layers_by_the_uniform_rule(world, tmp_path):
    root = tmp_path
    teacher = tiny_llm("llama", layers=4, seed=3)
    teacher.save_pretrained(root / "deep")
    student = tiny_llm("llama", layers=2, seed=4)
    student.save_pretrained(root / "shallow")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["teacher"])
    for d in ("deep", "shallow"):
        tok.save_pretrained(root / d)
    metrics = run_distill(_config(world, root / "run", student=str(root / "shallow"), teacher=str(root / "deep"),
                                  hidden_weight=0.5, max_tokens=32 * 8, eval_text=None))
    assert metrics["layers"]["layer_map"] == [1, 3]
    history = json.loads((root / "run" / "history.json").read_text())["train"]
    assert all(h["hidden"] > 0 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]


@given(st.integers(1, 48), st.integers(1, 48))
def test_uniform_layer_map_spreads_the_student_over_the_teacher(ls, lt):
    mapping = uniform_layer_map(ls, lt)
    assert len(mapping) == ls
    assert all(0 <= j < lt for j in mapping)
    assert mapping[-1] == lt - 1
    assert list(mapping) == sorted(mapping)
    if ls == lt:
        assert mapping == tuple(range(lt))
    if ls <= lt:
        assert len(set(mapping)) == ls  # no teacher layer matched twice


def test_hidden_loss_compares_the_mapped_layers():
    from types import SimpleNamespace

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    hidden = [torch.randn(2, 5, 8) for _ in range(5)]  # embeddings + 4 teacher layers
    teacher = SimpleNamespace(logits=logits, hidden_states=tuple(hidden))
    student = SimpleNamespace(logits=logits.clone(), hidden_states=(hidden[0], hidden[2], hidden[4]))
    loss, parts = causal_lm_distill_loss(student, teacher, 2.0, 1.0, uniform_layer_map(2, 4))
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and parts["hidden"] == pytest.approx(0.0, abs=1e-12)
    loss, parts = causal_lm_distill_loss(student, teacher, 2.0, 1.0, (0, 1))
    assert parts["hidden"] > 0.5


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing created


def _cli(world, out, *extra, student=None, teacher=None, train=None):
    return ["distill", "--student", str(student or world["student"]), "--teacher", str(teacher or world["teacher"]),
            "--train-text", str(train or world["train"]), "--output", str(out), "--max-tokens", "256",
            "--seqlen", "32", "--device", "cpu", "--no-progress", *extra]


def _other_vocab_teacher(world, root: Path, kind: str) -> Path:
    path = root / f"teacher_{kind}"
    if kind == "size":
        import transformers as tf

        config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        _tokenizer(_text(200)).save_pretrained(path)
    else:
        tiny_llm("llama", layers=2).save_pretrained(path)
        _tokenizer("completely different words make another vocabulary " * 30).save_pretrained(path)
    return path


@pytest.mark.parametrize("case, match", [
    ("vocab_size", "--teacher: .*vocabulary \\(128 tokens\\).*100"),
    ("tokenizer", "--teacher: .*maps every token to the same id"),
    ("short_text", "--train-text: got '.* tokens'; allowed: text of at least seqlen = 32"),
    ("short_eval", "--eval-text: got '.* tokens'; allowed: text of at least seqlen = 32"),
    ("missing_student", "--student: .*no such folder"),
    ("missing_train", "--train-text: .*no such file"),
    ("max_tokens", "--max-tokens: got 16; allowed: at least one window of --seqlen = 32"),
    ("existing_output", "--output: .*--resume.*not empty"),
    ("resume_nothing", "--output: .*allowed with --resume: a folder holding a checkpoint"),
    ("layer_map", "--layer-map: got '0,5'; allowed: 2 teacher layer indices"),
    ("lr", "--lr: got -1.0; allowed: a finite float > 0"),
])
def test_bad_input_fails_in_one_line_before_any_work(world, tmp_path, capsys, case, match):
    import re

    out = tmp_path / "out"
    extra, kw = [], {}
    if case in ("vocab_size", "tokenizer"):
        kw["teacher"] = _other_vocab_teacher(world, tmp_path, "size" if case == "vocab_size" else "tok")
    elif case == "short_text":
        short = tmp_path / "short.txt"
        short.write_text("the lazy dog.", encoding="utf-8")
        kw["train"] = short
    elif case == "short_eval":
        short = tmp_path / "short.txt"
        short.write_text("the lazy dog.", encoding="utf-8")
        extra = ["--eval-text", str(short)]
    elif case == "missing_student":
        kw["student"] = tmp_path / "nowhere"
    elif case == "missing_train":
        kw["train"] = tmp_path / "nowhere.txt"
    elif case == "max_tokens":
        extra = ["--max-tokens", "16"]
    elif case in ("existing_output", "resume_nothing"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        extra = ["--resume"] if case == "resume_nothing" else []
    elif case == "layer_map":
        extra = ["--hidden-weight", "1", "--layer-map", "0,5"]
    elif case == "lr":
        extra = ["--lr", "-1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(_cli(world, out, *extra, **kw))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("prunekit distill: error: "), err
    assert re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_finished_run_is_not_resumed(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_cli(world, out, "--max-tokens", "64")) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(_cli(world, out, "--max-tokens", "64", "--resume")) == 2
    assert "its run has finished" in capsys.readouterr().err
