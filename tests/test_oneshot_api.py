"""prunekit.oneshot on loaded models: exact sparsity for every family, masks kept, errors before any work."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit
from prunekit.errors import ConfigError, SelectionError
from prunekit.masks import mask_buffer_name
from prunekit.oneshot.methods import METHODS
from prunekit.oneshot.prune import prune_linear
from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import block_linears, find_decoder
from prunekit.patterns import parse_pattern
from llm_fixtures import tiny_llm

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def _ids(n=3, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _decoder_linears(model):
    structure = find_decoder(model)
    return {f"{structure.layer_name(i)}.{rel}": m for i, b in enumerate(structure.layers)
            for rel, m in block_linears(b).items()}


def _out_in(module):
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("pattern", ["1x1", "2:4"])
def test_every_family_gets_exact_sparsity_and_masks(kind, pattern):
    model = tiny_llm(kind, layers=2)
    head_before = model.get_output_embeddings().weight.detach().clone()
    report = prunekit.oneshot(model, _ids(), {"method": "magnitude", "pattern": pattern, "target_sparsity": 0.5,
                                              "nsamples": 3, "seqlen": 16}, progress=False)
    linears = _decoder_linears(model)
    assert [r.name for r in report.sparsity.layers] == list(linears)
    for name, module in linears.items():
        w = _out_in(module)
        if pattern == "2:4":  # every group of 4 consecutive inputs of a row holds exactly 2 zeros
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert bool((zeros == 2).all()), name
        else:
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
        mask = getattr(module, mask_buffer_name("weight"))
        assert mask.dtype == torch.bool and int(mask.sum()) == int((module.weight != 0).sum())
    assert torch.equal(model.get_output_embeddings().weight, head_before)  # lm_head / embeddings untouched
    assert report.sparsity.pruned_layers_sparsity == pytest.approx(0.5, abs=1e-3)
    assert set(report.layer_targets.values()) == {0.5}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 6), nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (1, 2)]),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_registered_methods_keep_the_exact_count_for_every_shape(rows, groups, nm, sparsity, seed):
    # every method in the registry, for 1x1 and N:M: the pipeline's guarantee (prune_linear checks it)
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    cols = groups * m
    x = torch.randn(64, cols, generator=gen)
    for name in METHODS.names():
        method = METHODS.get(name)
        if method.whole_model:  # scored from whole-model gradients, never through prune_linear
            continue
        options = prunekit.oneshot.OneShotConfig(method=name).method_options()
        for spec, s in (("1x1", sparsity), (f"{n}:{m}", n / m)):
            pattern = parse_pattern(spec)
            if "1x1" not in method.patterns and spec == "1x1" or "N:M" not in method.patterns and ":" in spec:
                continue
            layer = torch.nn.Linear(cols, rows, bias=False)
            layer.weight.data = torch.randn(rows, cols, generator=gen)
            stats = InputStats(cols, method.stat_kinds(options)) if method.stat_kinds(options) else None
            if stats is not None:
                stats.add(x)
            pruned = prune_linear("layer", layer, stats, s, pattern, method, options)
            keep = pruned.bound.expand(pruned.mask)
            if ":" in spec:
                assert bool((keep.reshape(rows, -1, m).sum(-1) == m - n).all())
            else:
                assert keep.numel() - int(keep.sum()) == round(s * keep.numel())
            assert bool((layer.weight[~keep] == 0).all())


def test_masks_let_training_continue_without_regrowth():
    model = tiny_llm("llama", layers=2)
    prunekit.oneshot(model, _ids(), {"method": "magnitude", "target_sparsity": 0.5}, progress=False)
    linears = _decoder_linears(model)
    zeros = {n: (m.weight == 0).clone() for n, m in linears.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruning = prunekit.prepare_pruning(
        model, {"target_sparsity": 0.5, "pattern": "1x1", "pruning_type": "magnitude", "lock_init_sparsity": True,
                "op_names": [r"layers\.\d+\.(self_attn|mlp)\."], "start_step": 0, "end_step": 0}, opt)
    for step in range(3):
        ids = _ids(2, 16, seed=10 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, module in linears.items():
        assert bool((module.weight[zeros[name]] == 0).all()), f"{name} regrew pruned weights"
        assert not bool((module.weight[~zeros[name]] == 0).all())
    assert pruning is not None


def test_output_dir_gets_a_loadable_checkout_and_report(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llm("gpt2", layers=2)
    out = tmp_path / "pruned"
    report = prunekit.oneshot(model, _ids(), {"method": "magnitude", "pattern": "4:8"}, output_dir=out,
                              progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no staging dir left behind
    data = json.loads((out / "report.json").read_text())
    assert data["pattern"] == "4:8" and data["sparsity"]["pruned_layers_sparsity"] == pytest.approx(0.5)
    assert (out / "report.png").stat().st_size > 1000
    again = AutoModelForCausalLM.from_pretrained(out)
    for name, module in _decoder_linears(again).items():
        assert torch.equal(module.weight, model.get_submodule(name).weight)
    assert report.wall_time_s > 0 and report.peak_rss_bytes > 0


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"config": {"method": "nope"}}, ConfigError, "method: got 'nope'"),
    ({"config": {"method": "magnitude", "pattern": "4x1"}}, ConfigError, "pattern: got '4x1'"),
    ({"config": {"method": "magnitude", "target_sparsity": 1.5}}, ConfigError, "target_sparsity: got 1.5"),
    ({"calibration": ["too short"], "tokenizer": _Tok()}, ConfigError, "calibration: got '9 tokens'"),
    ({"calibration": ["text"]}, ConfigError, "tokenizer: got None"),
    ({"calibration": torch.randn(2, 8)}, ConfigError, "calibration: got 'tensor"),
    ({"config": {"method": "magnitude", "op_names": ["nothing_matches"]}}, SelectionError, "select no linear"),
    ({"config": {"method": "magnitude", "op_names": ["lm_head"]}}, ConfigError, "op_names: got 'lm_head'"),
])
def test_bad_inputs_fail_before_any_work(tmp_path, kwargs, error, match):
    model = tiny_llm("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"calibration": _ids(), "config": {"method": "magnitude", "seqlen": 16}, **kwargs}
    with pytest.raises(error, match=match):
        prunekit.oneshot(model, args.pop("calibration"), args.pop("config"), output_dir=tmp_path / "out",
                         progress=False, **args)
    assert not list(tmp_path.iterdir())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_existing_output_dir_and_model_without_decoder_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="output_dir: got .*does not exist yet"):
        prunekit.oneshot(tiny_llm("llama"), _ids(), {"method": "magnitude"}, output_dir=tmp_path / "out")
    with pytest.raises(SelectionError, match="without decoder layers"):
        prunekit.oneshot(torch.nn.Sequential(torch.nn.Linear(4, 4)), _ids(), {"method": "magnitude"})


def test_whole_model_method_runs_through_the_same_call():
    model = tiny_llm("llama", layers=2)
    report = prunekit.oneshot(model, _ids(2, 16), {"method": "retrain_free", "pattern": "channelx1",
                                                   "target_sparsity": 0.25, "op_names": ["down_proj"]},
                              progress=False)
    down = model.model.layers[0].mlp.down_proj.weight
    dead_columns = int((down == 0).all(dim=0).sum())
    assert dead_columns > 0 and report.method == "retrain_free"
    assert [r.name for r in report.sparsity.layers] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(2, 9), st.just(0)), min_size=1, max_size=20), st.integers(4, 40))
def test_micro_batches_keep_every_row_in_order_within_the_token_budget(lengths, budget):
    # 0 stands for a user's dict batch, which passes through unchanged and splits the stacking
    from prunekit.oneshot.pipeline import micro_batches

    batches = [{"input_ids": torch.full((1, 3), i)} if n == 0 else torch.full((1, n), i) for i, n in enumerate(lengths)]
    out = micro_batches(batches, budget)
    rows = []
    for b in out:
        if isinstance(b, dict):
            rows.append(("dict", int(b["input_ids"][0, 0])))
            continue
        assert b.shape[0] == 1 or b.shape[0] * b.shape[1] <= budget
        rows.extend(("ids", int(r[0])) for r in b)
    assert rows == [("dict" if n == 0 else "ids", i) for i, n in enumerate(lengths)]


def test_micro_batching_does_not_change_what_is_pruned():
    from prunekit.oneshot.api import oneshot

    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    masks = []
    for rows in (1, 3):
        model = tiny_llm("llama", layers=2)
        batches = [ids[i:i + rows] for i in range(0, 6, rows)]  # already stacked by hand vs one window each
        oneshot(model, batches, {"method": "wanda", "pattern": "2:4"}, progress=False)
        masks.append([m.weight == 0 for m in model.modules() if isinstance(m, torch.nn.Linear)][:-1])
    agree = sum(int((a == b).sum()) for a, b in zip(*masks)) / sum(a.numel() for a in masks[0])
    assert agree > 0.999  # the same statistics up to float rounding
