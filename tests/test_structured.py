"""Structured one-shot pruning: scores, GQA-legal cuts, compensation, widths, reloads and every input error."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from prunekit.errors import ConfigError
from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import find_decoder
from prunekit.oneshot.structured import compensate
from prunekit.oneshot.structured.apply import apply_structured, layer_groups
from prunekit.oneshot.structured.cli import main as cli_main
from prunekit.oneshot.structured.heads import keep_for_shape, legal_shapes, shapes_for
from prunekit.oneshot.structured.importance import SCORES, collect_stats
from prunekit.oneshot.structured.plan import Request, _allocate, layer_costs, make_plan, round_width
from prunekit.slimming import load_slimmed
from prunekit.slimming.layers import layer_ops
from llm_fixtures import tiny_llm

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def _batches(n: int = 4, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seq), generator=g) for _ in range(n)]


def _prune(model, request: Request, modes=("auto", "auto"), hessian=True):
    structure = find_decoder(model)
    layers = layer_groups(model, structure)
    stats = collect_stats(model, _batches(), layers, structure, hessian=hessian, progress=False)
    costs = [layer_costs(model, g, structure.layers[g.index]) for g in layers]
    plan = make_plan(model, layers, stats, costs, request)
    structure, applied = apply_structured(model, structure, plan, stats, {"ffn": modes[0], "attention": modes[1]})
    return structure, applied, plan, stats


# --- scores on hand cases -------------------------------------------------------------------------------------
def _stats(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[-1], ("mean", "var", "sq_norm", "hessian"))
    s.add(x)
    return s


def test_scores_by_hand():
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [1.0, 0.0, 3.0]]))
    model = torch.nn.ModuleDict({"down": lin, "up": torch.nn.Linear(2, 3, bias=False)})
    with torch.no_grad():
        model["up"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0, 5.0], [3.0, 2.0, -1.0]])   # var: 1, 0, 9; mean sq: 5, 4, 13
    from prunekit.slimming.groups import FFNGroup

    group = FFNGroup("", ["up"], "down", 3)
    s = _stats(x)
    flap = SCORES.get("flap").ffn(model, group, s)
    torch.testing.assert_close(flap, torch.tensor([1.0 * 2, 0.0 * 4, 9.0 * 9]))
    wanda = SCORES.get("wanda-sp").ffn(model, group, s)
    torch.testing.assert_close(wanda, torch.tensor([2 * 5 ** 0.5, 2 * 2.0, 3 * 13 ** 0.5]))
    norm = SCORES.get("weight-norm").ffn(model, group, None)
    torch.testing.assert_close(norm, torch.tensor([3.0, 8.0, 17.0]).sqrt())  # column² + producer row²


# --- GQA-legal head sets --------------------------------------------------------------------------------------
def test_smollm2_head_shapes():
    shapes = shapes_for(9, 3, 0.34)
    assert {(s.groups, s.per_group) for s in shapes} == {(3, 2), (2, 3)}
    with pytest.raises(ConfigError, match=r"0\.333 \(6 kept\)") as err:
        shapes_for(9, 3, 0.2)
    assert "head_sparsity" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="kv-groups"):
        shapes_for(9, 3, 0.56, "kv-groups")  # 4 kept = 2 x 2 needs query-head cuts


@settings(max_examples=200, deadline=None)
@given(kv=st.integers(1, 8), per=st.integers(1, 6), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 99),
       cut=st.sampled_from(["auto", "kv-groups", "query-heads"]))
def test_head_cuts_are_always_legal(kv, per, sparsity, seed, cut):
    heads = kv * per
    try:
        shapes = shapes_for(heads, kv, sparsity, cut)
    except ConfigError as err:  # an illegal request names the legal values, never an empty list
        assert "kept)" in str(err) and not any(s.heads == round((1 - sparsity) * heads)
                                             for s in legal_shapes(heads, kv)
                                             if cut == "auto")
        return
    scores = torch.rand(heads, generator=torch.Generator().manual_seed(seed))
    for shape in shapes:
        keep, keep_kv, removed = keep_for_shape(scores, kv, shape)
        assert len(keep) == shape.heads == round((1 - sparsity) * heads) >= 1
        per_group = [sum(1 for h in keep if h // per == g) for g in keep_kv]
        assert per_group == [shape.per_group] * shape.groups   # every kept group non-empty and equal
        assert all(h // per in keep_kv for h in keep)
        assert removed == pytest.approx(float(scores.sum()) - float(scores[keep].sum()), abs=1e-5)


# --- compensation exactness -----------------------------------------------------------------------------------
def test_bias_fold_is_exact_on_the_mean():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(100, 8, generator=g) + 2
    s = _stats(x)
    keep, removed = torch.tensor([0, 2, 3, 7]), torch.tensor([1, 4, 5, 6])
    new_b = compensate.fold_mean(w, b, s.mean, removed)
    torch.testing.assert_close(w[:, keep] @ s.mean[keep] + new_b, w @ s.mean + b)


def test_least_squares_recovers_redundant_columns():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, 4, generator=g)
    x = torch.cat([base, base[:, :2] * 2 - base[:, 2:3]], dim=1)   # features 4, 5 are combinations of 0-2
    w = torch.randn(3, 6, generator=g)
    keep = torch.arange(4)
    new_w, _ = compensate.least_squares(w, None, _stats(x), keep, damping=0.0)
    torch.testing.assert_close(x[:, :4] @ new_w.T, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_pruned_layer_matches_dense_on_calibration_mean(kind):
    # the FLAP fold: each pruned consumer maps the kept part of the calibration mean to the dense output
    model = tiny_llm(kind, layers=2)
    dense = {n: (layer_ops(m).weight_2d(m).detach().clone(), None if m.bias is None else m.bias.detach().clone())
             for n, m in model.named_modules() if layer_ops(m) is not None}
    structure, applied, plan, stats = _prune(model, Request(ffn_sparsity=0.33, head_sparsity=0.5, round_to=8,
                                                            method="flap"), ("bias", "bias"), hessian=False)
    assert applied.compensation == {"ffn": "bias", "attention": "bias"}
    for g in layer_groups(model, structure):
        cut = plan.cuts[g.index]
        for name, s, keep in ((g.ffn.consumer, stats[g.index].ffn, cut.ffn_keep),
                              (g.attention.o, stats[g.index].attention,
                               g.attention.feature_index("o", cut.heads_keep))):
            w, b = dense[name]
            module = model.get_submodule(name)
            w2d = w if w.shape[1] == s.in_features else w.T
            new = module.weight if module.weight.shape[1] == len(keep) else module.weight.T
            want = w2d @ s.mean + (0 if b is None else b)
            torch.testing.assert_close(new @ s.mean[keep] + module.bias, want, rtol=1e-4, atol=1e-5)


# --- widths, families, reloads --------------------------------------------------------------------------------
def test_round_width():
    assert round_width(1536, 0.33, 32) == 1024
    assert round_width(1536, 0.15, 32) == 1312
    assert round_width(1536, 0.5, 32) == 768
    assert round_width(96, 0.9, 32) == 0
    assert round_width(96, 0.05, 32) == 96


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_prunes_and_reloads(kind, tmp_path):
    from prunekit.slimming import save_slimmed

    model = tiny_llm(kind, layers=3)
    width = layer_groups(model, find_decoder(model))[0].ffn.width
    ids = torch.randint(0, 128, (1, 12))
    structure, applied, plan, _ = _prune(model, Request(ffn_sparsity=0.33, head_sparsity=0.5, drop_layers=1))
    widths = {g.ffn.width for g in layer_groups(model, structure)}
    assert len(structure) == 2 and widths == {round_width(width, 0.33, 32)} != {width}
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_slimmed(model, tmp_path / kind)
    again = load_slimmed(tmp_path / kind)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    # renumbered layer_idx: generation with the KV cache equals generation without it
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_uniform_gqa_reloads_with_plain_transformers(kind, tmp_path):
    import transformers

    from prunekit.slimming import save_slimmed

    model = tiny_llm(kind, layers=2)
    structure, applied, *_ = _prune(model, Request(ffn_sparsity=0.33, head_sparsity=0.5))
    # qwen2 / mistral cannot carry an o_proj / down_proj bias: least squares instead; llama gets its flags
    expected = "bias" if kind == "llama" else "lstsq"
    assert applied.compensation == {"ffn": expected, "attention": expected}
    save_slimmed(model, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    config = again.config
    assert config.intermediate_size == 64 and config.num_attention_heads == 2 and config.head_dim == 16


def test_non_uniform_widths_load_through_load_slimmed(tmp_path):
    from prunekit.slimming import save_slimmed

    # standardised per layer: a layer with a few weak channels keeps more than one with a few strong ones
    few_weak, few_strong = torch.ones(96), torch.zeros(96)
    few_weak[:6], few_strong[:6] = 0.0, 1.0
    scores = {0: few_weak, 1: few_strong, 2: torch.arange(96.0)}
    widths = _allocate(scores, 3 * 64, 96, 32)
    assert all(w % 32 == 0 for w in widths.values()) and widths[0] > widths[1]

    model = tiny_llm("llama", layers=3)
    structure, *_ = _prune(model, Request(ffn_sparsity=0.4, non_uniform=True, round_to=8))
    widths = [g.ffn.width for g in layer_groups(model, structure)]
    assert all(w % 8 == 0 for w in widths)
    save_slimmed(model, tmp_path)
    again = load_slimmed(tmp_path)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert [g.ffn.width for g in layer_groups(again, find_decoder(again))] == widths


def test_target_params_solves_for_the_ffn_width():
    model = tiny_llm("llama", layers=2)
    structure = find_decoder(model)
    layers = layer_groups(model, structure)
    costs = [layer_costs(model, g, structure.layers[g.index]) for g in layers]
    dense = sum(c.total for c in costs)
    plan = make_plan(model, layers, [], costs, Request(target_params=0.8, method="weight-norm", round_to=8))
    width = plan.ffn_widths[0]
    kept = sum(c.params(width, c.heads, c.kv_heads) for c in costs)
    assert kept <= 0.8 * dense < sum(c.params(width + 8, c.heads, c.kv_heads) for c in costs)
    with pytest.raises(ConfigError, match="target_params"):
        make_plan(model, layers, [], costs, Request(target_params=0.05, method="weight-norm"))


# --- the command: end to end and every bad input ----------------------------------------------------------------
def _tiny_checkout(tmp_path, kind="llama"):
    """A tiny model directory with a word-level tokenizer, plus a calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(120)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "model"
    tiny_llm(kind, layers=3).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(0, 120, (2000,), generator=g).tolist()))
    return path, text


def _cli(model, text, out, *extra):
    return cli_main(["--model", str(model), "--calibration", str(text), "--nsamples", "4", "--seqlen", "32",
                     "--output", str(out), "--device", "cpu", *extra])


def test_command_writes_a_plain_reloadable_checkout(tmp_path, capsys):
    import transformers

    model, text = _tiny_checkout(tmp_path)
    out = tmp_path / "out"
    assert _cli(model, text, out, "--ffn-sparsity", "0.33", "--head-sparsity", "0.5", "--drop-layers", "1",
                "--eval-text", str(text), "--eval-windows", "2") == 0
    report = json.loads((out / "structured_report.json").read_text())
    assert report["loads_with"] == "from_pretrained" and report["ffn_widths"] == [64, 64]
    assert report["decoder_params_after"] < report["decoder_params_before"] and len(report["dropped_layers"]) == 1
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert again.config.num_hidden_layers == 2 and again.config.intermediate_size == 64
    assert again.config.mlp_bias and again.config.head_dim == 16
    assert "decoder params" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp dir left behind


@pytest.mark.parametrize("extra, key", [
    (["--ffn-sparsity", "1.0"], "ffn_sparsity"),
    (["--ffn-sparsity", "0.9"], "ffn_sparsity"),               # rounds 96 channels to 0 with round_to 32
    (["--head-sparsity", "0.25"], "head_sparsity"),            # 3 of 4 heads over 2 kv heads: unequal groups
    (["--drop-layers", "3"], "drop_layers"),
    (["--ffn-sparsity", "0.3", "--target-params", "0.8"], "target_params"),
    (["--target-params", "0.01"], "target_params"),
    ([], "ffn_sparsity"),                                      # nothing to remove
    (["--ffn-sparsity", "0.3", "--method", "magnitude"], "method"),
    (["--ffn-sparsity", "0.3", "--compensation", "bias", "--method", "flap"], None),
    (["--ffn-sparsity", "0.3", "--seqlen", "100000"], "calibration"),   # text shorter than one window
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, extra, key):
    model, text = _tiny_checkout(tmp_path, "qwen2" if "--compensation" in extra else "llama")
    if key is None:
        key = "compensation"          # qwen2 has no bias slot on down_proj: bias would not survive a reload
    out = tmp_path / "out"
    capsys.readouterr()               # the fixture's own output
    assert _cli(model, text, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]      # (a loading bar may come first when the check needs the model's shapes)
    assert f"error: {key}:" in last and err.count("error:") == 1 and "Traceback" not in err
    assert "layer/s" not in err      # refused before the calibration pass (its progress bar never started)
    assert not out.exists()


def test_existing_output_is_refused(tmp_path, capsys):
    model, text = _tiny_checkout(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert _cli(model, text, out, "--ffn-sparsity", "0.33") == 2
    assert "error: output:" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_smollm2_end_to_end_small_budget(tmp_path):
    import transformers
    from llm_fixtures import smollm2_dir

    src = smollm2_dir()
    text = tmp_path / "cal.txt"
    from prunekit.oneshot.data import squad_paragraphs
    import os

    squad = os.path.join(os.environ.get("PRUNEKIT_DATA_DIR", "/work/shared/data"), "squad", "dev-v1.1.json")
    text.write_text("\n\n".join(squad_paragraphs(squad, (0, 2))))
    out = tmp_path / "out"
    assert cli_main(["--model", str(src), "--calibration", str(text), "--nsamples", "2", "--seqlen", "32",
                     "--output", str(out), "--device", "cpu", "--ffn-sparsity", "0.33",
                     "--head-sparsity", "0.34"]) == 0
    report = json.loads((out / "structured_report.json").read_text())
    assert report["decoder_fraction_kept"] <= 0.76 and report["loads_with"] == "from_pretrained"
    assert set(report["heads"]) == {6} and set(report["kv_heads"]) <= {2, 3}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5 and model.config.intermediate_size == 1024


def test_prunekit_oneshot_structured_is_the_structured_command(tmp_path, capsys):
    # `prunekit oneshot --structured` reaches this command (its --method means an importance score, not sparsegpt)
    from prunekit.cli import main

    model, text = _tiny_checkout(tmp_path)
    out = tmp_path / "out"
    assert main(["oneshot", "--structured", "--model", str(model), "--calibration", str(text), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(out), "--device", "cpu", "--ffn-sparsity", "0.33",
                 "--method", "wanda-sp"]) == 0
    assert json.loads((out / "structured_report.json").read_text())["ffn_widths"] == [64, 64, 64]
    capsys.readouterr()
    assert main(["oneshot", "--structured", "--model", str(tmp_path / "missing"), "--calibration", str(text),
                 "--output", str(tmp_path / "out2"), "--ffn-sparsity", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit oneshot --structured: error: model:") and len(err.splitlines()) == 1


def test_structured_bench_rejects_a_bad_recovery_window_before_any_work():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "structured.py"
    # without the check the script starts pruning: the timeout turns that into a failure, not a hang
    done = subprocess.run([sys.executable, str(script), "--recovery-seqlen", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--recovery-seqlen: got 1; allowed >= 2" in done.stderr.strip().splitlines()[-1]
