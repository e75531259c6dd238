"""The sequential pipeline reproduces the model's own forward block by block, for every supported family."""
from __future__ import annotations

import pytest
import torch

from prunekit.errors import ConfigError, SelectionError
from prunekit.oneshot import (InputStats, block_linears, calibration_windows, evaluation_windows, find_decoder,
                              run_sequential)
from llm_fixtures import tiny_llm

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_sequential_pass_matches_model_forward(kind):
    model = tiny_llm(kind, layers=3)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        expected = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    seen: list[list[torch.Tensor]] = []

    def on_layer(ctx):
        # the inputs a block receives are exactly the model's hidden states before it, per batch
        for b, exp in zip(ctx.inputs, expected):
            torch.testing.assert_close(b.hidden, exp[ctx.index], rtol=1e-5, atol=1e-5)
        seen.append(ctx.forward())

    structure = run_sequential(model, batches, on_layer, progress=False)
    assert len(structure) == 3 and len(seen) == 3
    # block outputs of all but the last block equal the next hidden state (the last passes the final norm)
    for i in range(2):
        for out, exp in zip(seen[i], expected):
            torch.testing.assert_close(out, exp[i + 1], rtol=1e-5, atol=1e-5)


def test_every_batch_keeps_its_own_extras():
    # the original reused batch 0's positional extras; here a batch with padding keeps its own mask
    model = tiny_llm("llama", layers=2)  # block 0's output is hidden_states[1] (the last one is normed)
    ids = torch.randint(0, 128, (1, 12))
    masked = {"input_ids": ids, "attention_mask": torch.cat([torch.zeros(1, 4), torch.ones(1, 8)], 1).long()}
    plain = {"input_ids": ids}
    with torch.no_grad():
        exp = [model(**b, output_hidden_states=True).hidden_states[1] for b in (masked, plain)]
    outs = []
    run_sequential(model, [masked, plain], lambda ctx: outs.extend(ctx.forward()) if ctx.index == 0 else None,
                   progress=False)
    torch.testing.assert_close(outs[0][:, 4:], exp[0][:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], exp[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0][:, 4:], outs[1][:, 4:])


def test_collect_stats_match_direct_computation():
    model = tiny_llm("llama", layers=1)
    batches = [torch.randint(0, 128, (2, 8)) for _ in range(2)]
    xs = []
    down = model.model.layers[0].mlp.down_proj
    h = down.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    got = {}

    def on_layer(ctx):
        got.update(ctx.collect(block_linears(ctx.block), ["hessian", "sq_norm", "mean", "var"]))

    run_sequential(model, batches, on_layer, progress=False)
    h.remove()
    x = torch.cat(xs[:2])  # the collect pass (the pipeline's own forward adds more)
    s = got["mlp.down_proj"]
    torch.testing.assert_close(s.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.sq_norm, (x * x).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.var, x.var(0, unbiased=False), rtol=1e-3, atol=1e-5)
    assert set(got) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_stats_do_not_depend_on_batching():
    x = torch.randn(40, 6)
    one, many = InputStats(6, ["hessian", "var"]), InputStats(6, ["hessian", "var"])
    one.add(x)
    for chunk in x.split(7):
        many.add(chunk)
    torch.testing.assert_close(one.hessian, many.hessian)
    torch.testing.assert_close(one.var, many.var)


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(SelectionError, match="without decoder layers"):
        find_decoder(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


class _Tok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 50) for c in text]}


def test_windows_are_seeded_and_refuse_short_text():
    texts = ["abcdefghij" * 10, "klmnop" * 10]
    a = calibration_windows(texts, _Tok(), nsamples=4, seqlen=16, seed=3)
    b = calibration_windows(texts, _Tok(), nsamples=4, seqlen=16, seed=3)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert not torch.equal(a, calibration_windows(texts, _Tok(), nsamples=4, seqlen=16, seed=4))
    ev = evaluation_windows(texts, _Tok(), seqlen=16)
    assert ev.shape == (161 // 16, 16)
    with pytest.raises(ConfigError, match="calibration: got '9 tokens'"):
        calibration_windows(["short txt"], _Tok(), nsamples=1, seqlen=16)


def test_a_squad_file_gives_calibration_or_held_out_articles_never_both():
    # the same SQuAD file serves --calibration and --eval-text: evaluation must not read calibration text
    import os
    from pathlib import Path

    from prunekit.oneshot import load_texts, squad_paragraphs

    path = Path(os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data")) / "squad" / "dev-v1.1.json"
    if not path.is_file():
        pytest.skip(f"no SQuAD file at {path}")
    calibration, held_out = load_texts(path), load_texts(path, held_out=True)
    assert calibration == squad_paragraphs(path, (0, 38)) and held_out == squad_paragraphs(path, (38, 48))
    assert calibration and held_out and not set(calibration) & set(held_out)


EXPECTED_GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"],
            ["fc2"]],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_GROUPS))
def test_input_groups_follow_the_tensors_each_linear_reads(kind):
    model = tiny_llm(kind, layers=1)
    got = []
    run_sequential(model, [torch.randint(0, 128, (1, 8))],
                   lambda ctx: got.append(ctx.input_groups(block_linears(ctx.block))), progress=False)
    assert [sorted(g) for g in got[0]] == [sorted(g) for g in EXPECTED_GROUPS[kind]]


def test_shared_stats_equal_separate_ones_and_stop_early_sees_the_same_inputs():
    model = tiny_llm("llama", layers=1)
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = {}

    def on_layer(ctx):
        linears = block_linears(ctx.block)
        groups = ctx.input_groups(linears)
        out["separate"] = ctx.collect(linears, ["hessian", "sq_norm"])
        out["shared"] = ctx.collect(linears, ["hessian", "sq_norm"], shared=groups)
        first = {n: linears[n] for n in groups[0]}
        out["early"] = ctx.collect(first, ["hessian"], stop_early=True, shared=groups)

    run_sequential(model, batches, on_layer, progress=False)
    sep, sh = out["separate"], out["shared"]
    assert sh["self_attn.q_proj"] is sh["self_attn.v_proj"] and sh["mlp.gate_proj"] is sh["mlp.up_proj"]
    assert sh["self_attn.q_proj"] is not sh["self_attn.o_proj"]
    for name in sep:
        torch.testing.assert_close(sh[name].hessian, sep[name].hessian)
        torch.testing.assert_close(sh[name].sq_norm, sep[name].sq_norm)
    torch.testing.assert_close(out["early"]["self_attn.k_proj"].hessian, sep["self_attn.k_proj"].hessian)
