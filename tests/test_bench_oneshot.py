"""bench/oneshot.py and bench/llm_common.py: the one-shot LLM bench's protocol, checks and table cannot silently break.

Pure helpers run on tiny inputs; the peer end-to-end smoke run needs the bench venv (/work/bench-venv, made by
bench/setup_peers.sh) and skips without it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
PEER_PYTHON = Path("/work/bench-venv/bin/python")


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # oneshot.py imports llm_common as a sibling
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lc():
    return _load("llm_common")


@pytest.fixture(scope="module")
def bench():
    return _load("oneshot")


def _fake_squad(articles: int = 48, paragraphs: int = 2, words: int = 60) -> dict:
    """SQuAD-shaped JSON whose paragraph k of article a reads 'a<a>p<k> w0 w1 ...' (so splits are checkable)."""
    return {"version": "1.1", "data": [
        {"title": f"t{a}", "paragraphs": [
            {"context": f"a{a}p{k} " + " ".join(f"w{(a * 7 + k * 3 + i) % 50}" for i in range(words)), "qas": []}
            for k in range(paragraphs)]}
        for a in range(articles)]}


class WordTokenizer:
    """Whitespace tokenizer with a fixed vocabulary: enough for the data protocol."""

    def __init__(self, text: str) -> None:
        self.vocab = {w: i for i, w in enumerate(dict.fromkeys(text.split()))}

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        assert not add_special_tokens  # the protocol never adds BOS/EOS
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_splits_are_articles_1_to_38_and_39_to_48(lc):
    squad = _fake_squad()
    calib, held = lc.wiki_text("calibration", squad), lc.wiki_text("heldout", squad)
    assert calib.startswith("a0p0 ") and "a37p1" in calib and "a38p0" not in calib
    assert held.startswith("a38p0 ") and "a47p1" in held and "a37p1" not in held
    assert calib.count("\n\n") == 38 * 2 - 1  # paragraph by paragraph
    with pytest.raises(ValueError, match="split='train'"):
        lc.wiki_text("train", squad)
    with pytest.raises(ValueError, match="needs 48"):
        lc.wiki_text("heldout", _fake_squad(articles=40))


def test_calibration_windows_are_seeded_slices(lc):
    ids = torch.arange(1000)
    a, b = lc.calibration_windows(ids, 8, 16, seed=0), lc.calibration_windows(ids, 8, 16, seed=0)
    assert a.shape == (8, 16) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, lc.calibration_windows(ids, 8, 16, seed=1))
    # each window is a contiguous run of the text
    assert torch.equal(a - a[:, :1], torch.arange(16).expand(8, 16))
    assert lc.calibration_windows(torch.arange(16), 3, 16, seed=0).tolist() == [list(range(16))] * 3
    with pytest.raises(ValueError, match="fewer than one window"):
        lc.calibration_windows(torch.arange(10), 4, 16, seed=0)


def test_eval_windows_are_the_first_consecutive_blocks(lc):
    w = lc.eval_windows(torch.arange(100), 16, 3)
    assert torch.equal(w.flatten(), torch.arange(48))
    with pytest.raises(ValueError, match="1..6 windows"):
        lc.eval_windows(torch.arange(100), 16, 7)


def test_prepare_windows_uses_the_protocol(bench):
    squad = _fake_squad(words=200)
    tok = WordTokenizer(" ".join(p["context"] for a in squad["data"] for p in a["paragraphs"]))
    calibs, held = bench.prepare_windows(tok, nsamples=5, seqlen=32, eval_count=4, seeds=[0, 1], squad=squad)
    calib = calibs[0]
    assert not torch.equal(calibs[0], calibs[1])  # each seed draws its own starts
    assert calib.shape == (5, 32) and held.shape == (4, 32)
    assert held[0, 0] == tok.vocab["a38p0"]  # held out starts at article 39
    calib_vocab = {tok.vocab[w] for w in bench.llm_common.wiki_text("calibration", squad).split()}
    assert set(calib.flatten().tolist()) <= calib_vocab


class UniformLM(nn.Module):
    """A causal LM whose logits are all equal: its perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_uniform_logits_is_the_vocab_size(lc):
    windows = torch.randint(0, 37, (3, 9))
    assert lc.perplexity(UniformLM(37), windows, batch_size=2) == pytest.approx(37.0, rel=1e-5)


def test_perplexity_is_exp_of_token_mean_nll(lc):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 11))

    class Wrap(nn.Module):
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": model(input_ids)})()

    windows = torch.randint(0, 11, (4, 6))
    with torch.no_grad():
        logits = model(windows)[:, :-1]
    expected = math.exp(float(nn.functional.cross_entropy(logits.reshape(-1, 11), windows[:, 1:].reshape(-1))))
    assert lc.perplexity(Wrap(), windows, batch_size=3) == pytest.approx(expected, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 8), seed=st.integers(0, 2**16), n=st.sampled_from([1, 2, 3]))
def test_nm_checker_counts_exactly_the_short_groups(lc, rows, groups, seed, n):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 4, generator=gen).abs() + 0.1  # no zero by chance
    order = torch.rand(rows, groups, 4, generator=gen).argsort(dim=-1)
    keep = torch.ones(rows, groups, 4, dtype=torch.bool).scatter(-1, order[..., :n], False)
    pruned = (w.view(rows, groups, 4) * keep).view(rows, -1)
    assert lc.nm_violations(pruned, n, 4) == 0
    # give back one zero in a random set of groups: exactly those fall short
    spoil = torch.rand(rows, groups, generator=gen) < 0.5
    spoiled = pruned.view(rows, groups, 4).clone()
    idx = order[..., 0]
    spoiled.scatter_(-1, idx.unsqueeze(-1), torch.where(spoil, 1.0, 0.0).unsqueeze(-1))
    assert lc.nm_violations(spoiled.view(rows, -1), n, 4) == int(spoil.sum())
    with pytest.raises(ValueError, match="multiple of m=4"):
        lc.nm_violations(torch.zeros(2, 6), 2, 4)


def test_sparsity_stats_on_a_tiny_llama(lc):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    with torch.no_grad():
        for _, lin in lc.decoder_linears(model):
            w = lin.weight.view(lin.weight.shape[0], -1, 4)
            w[..., :2] = 0  # 2:4 everywhere
    stats = lc.sparsity_stats(model)
    assert stats["linears"] == 14 and stats["sparsity"] == 0.5 and stats["is_2:4"]
    assert stats["groups_below_2of4_zeros"] == 0 and stats["lm_head_zeros"] == 0
    assert "lm_head" not in stats["per_layer"] and all(v == 0.5 for v in stats["per_layer"].values())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1.0
    assert lc.sparsity_stats(model)["groups_below_2of4_zeros"] == 1


def _run(cell: str, tool: str, ppl: float, wall: float, rss: float, rc: int = 0, seed: int = 0) -> dict:
    r = {"cell": cell, "seed": seed, "tool": tool, "rc": rc, "wall_s": wall, "peak_rss_mib": rss, "log": "x.log"}
    if rc == 0:
        r.update(perplexity=ppl, sparsity=0.5, groups_below_2of4_zeros=0)
    return r


def test_table_and_ratios(bench):
    runs = [_run("sparsegpt-2:4", "prunekit", 30.0, 50.0, 800.0), _run("sparsegpt-2:4", "llm-compressor", 40.0, 100.0, 1600.0),
            _run("magnitude-1x1", "prunekit", 90.0, 10.0, 500.0), _run("wanda-2:4", "llm-compressor", 0, 0, 0, rc=1)]
    assert bench.compare(runs) == {"sparsegpt-2:4": {
        "perplexity": 0.75, "wall_s": 0.5, "peak_rss_mib": 0.5, "seeds": 1, "perplexity_wins": 1,
        "per_seed": {0: {"perplexity": 0.75, "wall_s": 0.5, "peak_rss_mib": 0.5}}}}
    table = bench.markdown_table(runs, dense_ppl=20.0).splitlines()
    assert table[2] == "| dense | – | – | 20.000 | 1.000 | – | – | – | – |"
    assert table[3] == "| sparsegpt-2:4 | 0 | prunekit | 30.000 | 1.500 | 0.5000 | 0 | 50.0 | 800 |"
    assert table[5].startswith("| magnitude-1x1 | 0 | prunekit | 90.000 | 4.500 | 0.5000 | – |")  # no N:M for 1x1
    assert "failed (rc 1" in table[6]


def test_ratios_pair_runs_by_seed_and_take_geometric_means(bench):
    runs = [_run("wanda-2:4", "prunekit", 99.0, 10.0, 100.0, seed=0), _run("wanda-2:4", "llm-compressor", 100.0, 20.0, 200.0, seed=0),
            _run("wanda-2:4", "prunekit", 102.0, 40.0, 100.0, seed=3), _run("wanda-2:4", "llm-compressor", 100.0, 20.0, 400.0, seed=3),
            _run("wanda-2:4", "prunekit", 50.0, 1.0, 1.0, seed=7)]  # no peer run for seed 7: not paired
    r = bench.compare(runs)["wanda-2:4"]
    assert r["seeds"] == 2 and r["perplexity_wins"] == 1 and set(r["per_seed"]) == {0, 3}
    assert r["perplexity"] == pytest.approx(math.sqrt(0.99 * 1.02))
    assert r["wall_s"] == pytest.approx(1.0) and r["peak_rss_mib"] == pytest.approx(math.sqrt(0.5 * 0.25))
    table = bench.ratio_table(bench.compare(runs)).splitlines()
    assert table[2].startswith("| wanda-2:4 | 2 | 1.0049 | 1 / 2 | 0: 0.9900, 3: 1.0200 | 1.000 |")
    assert bench.ratio_table({}) == ""
    rows = bench.markdown_table(runs, None).splitlines()
    assert rows[4].startswith("| wanda-2:4 | 3 | prunekit | 102.000 |")


def test_plot_writes_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_run("sparsegpt-1x1", "prunekit", 30.0, 1, 1), _run("sparsegpt-1x1", "llm-compressor", 31.0, 1, 1)]
    assert bench.plot(runs, 20.0, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_run_measured_reports_the_childs_own_peak_rss(bench, tmp_path):
    code = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('noise'); print('{\"ok\": 1}')"
    out = bench.run_measured([sys.executable, "-c", code], tmp_path / "a.log")
    assert out["rc"] == 0 and out["record"] == {"ok": 1} and out["peak_rss_mib"] > 300
    small = bench.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "b.log")
    assert small["rc"] == 3 and small["peak_rss_mib"] < 300 and small["log_tail"] is not None


def test_an_interrupted_run_stops_the_tool_too(bench, tmp_path):
    import os
    import signal

    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"

    def interrupt(*_):
        if not pid_file.exists():  # the child is not up yet (slow machine): look again shortly
            signal.alarm(1)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(1)
        with pytest.raises(KeyboardInterrupt):
            bench.run_measured([sys.executable, "-c", code], tmp_path / "c.log")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # gone (and reaped by GNU time), not left running
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_cells_and_bad_flags_fail_before_any_work(bench, tmp_path, capsys):
    assert [c.name for c in bench.parse_cells(["wanda-2:4", "sparsegpt-1x1", "wanda-2:4"])] == ["wanda-2:4", "sparsegpt-1x1"]
    assert bench.CELLS["wanda-2:4"].nm == (2, 4) and bench.CELLS["sparsegpt-1x1"].nm is None
    with pytest.raises(ValueError, match=r"--cells: got \['wanda-4:8'\]; allowed"):
        bench.parse_cells(["wanda-4:8"])
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    for argv, message in [
        (["--cells", "nope"], "--cells: got ['nope']"),
        (["--model", str(tmp_path / "missing")], "--model: got"),
        (["--model", str(model), "--skip-peer", "--skip-prunekit"], "leave nothing to run"),
        (["--model", str(model), "--skip-prunekit", "--peer-python", str(tmp_path / "nopy")], "--peer-python: got"),
        (["--model", str(model), "--skip-prunekit", "--peer-python", sys.executable, "--output", str(busy)],
         "exists and is not empty"),
        (["--model", str(model), "--sparsity", "1.5"], "--sparsity: got 1.5"),
        (["--model", str(model), "--seeds", "0", "-1"], "--seeds: got [0, -1]"),
    ]:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"


def test_missing_prunekit_api_is_a_clear_error(bench, tmp_path, monkeypatch, capsys):
    import prunekit

    monkeypatch.delattr(prunekit, "oneshot", raising=False)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", str(model), "--skip-peer"])
    assert "prunekit.oneshot is not in this venv's prunekit yet; pass --skip-prunekit" in capsys.readouterr().err


def _tiny_llama_dir(dst: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunekit.recipes.testing import shared_model_dir

    src = shared_model_dir()
    if not (src / "tokenizer.json").exists() and not (src / "vocab.txt").exists():
        pytest.skip(f"shared tokenizer {src} is absent")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=128)).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="no peer venv at /work/bench-venv (bash bench/setup_peers.sh)")
def test_peer_smoke_run_end_to_end(bench, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "squad").mkdir(parents=True)
    (data / "squad" / "dev-v1.1.json").write_text(json.dumps(_fake_squad(words=200)))
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(data))
    model = _tiny_llama_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    rc = bench.main(["--model", str(model), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2",
                     "--cells", "wanda-2:4", "--skip-prunekit", "--peer-python", str(PEER_PYTHON), "--output", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    (run,) = doc["runs"]
    assert run["tool"] == "llm-compressor" and run["record"]["version"].startswith("0.14.")
    assert run["is_2:4"] and run["sparsity"] == 0.5 and run["lm_head_zeros"] == 0 and run["plain_config"]
    assert run["peak_rss_mib"] > 0 and math.isfinite(run["perplexity"])
    assert not (out / "models" / "llm-compressor-wanda-2of4-seed0").exists()  # deleted after scoring
    assert (out / "calibration-seed0.pt").is_file() and run["seed"] == 0
    printed = capsys.readouterr().out
    assert "| wanda-2:4 | 0 | llm-compressor |" in printed and "paired seeds" not in printed  # nothing to pair
