"""The original's one-shot call shapes: prepare_pruning(sparse_gpt, dataloader=) and prune_wanda(...)."""
from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.compat import WeightPruningConfig, prepare_pruning, prune_wanda
from prunekit.errors import ConfigError
from prunekit.masks import mask_buffer_name
from prunekit.oneshot.structure import block_linears, find_decoder
from llm_fixtures import tiny_llm


def _linears(model):
    s = find_decoder(model)
    return {f"{s.layer_name(i)}.{r}": m for i, b in enumerate(s.layers) for r, m in block_linears(b).items()}


def _loader(kind="dict", n=3, seqlen=16):
    gen = torch.Generator().manual_seed(5)
    for _ in range(n):
        ids = torch.randint(0, 128, (2, seqlen), generator=gen)
        if kind == "dict":
            mask = torch.ones_like(ids)
            mask[0, :3] = 0  # a padded row: this batch's own mask must be used, not the first batch's
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids}
        elif kind == "tensor":
            yield ids
        else:
            yield (ids, ids)


@pytest.mark.parametrize("kind", ["dict", "tensor", "tuple"])
@pytest.mark.parametrize("pattern, target", [("1x1", 0.5), ("2:4", 0.5)])
def test_prepare_pruning_runs_sparse_gpt_to_completion(kind, pattern, target):
    model = tiny_llm("llama", layers=2)
    config = WeightPruningConfig(pruning_type="sparse_gpt", target_sparsity=target, pattern=pattern,
                                 excluded_op_names=["down_proj"])
    report = prepare_pruning(model, config, dataloader=_loader(kind), device="cpu")
    for name, module in _linears(model).items():
        w = module.weight
        if "down_proj" in name:
            assert int((w == 0).sum()) == 0 and not hasattr(module, mask_buffer_name("weight"))
            continue
        assert hasattr(module, mask_buffer_name("weight")), name  # masks kept (the original dropped them)
        if pattern == "2:4":
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all())
        else:
            assert int((w == 0).sum()) == round(0.5 * w.numel())
    assert report.method == "sparsegpt" and report.nsamples == 3


def test_sparse_gpt_through_compat_equals_prunekit_oneshot():
    a, b = tiny_llm("gpt2", layers=2), tiny_llm("gpt2", layers=2)
    batches = list(_loader("dict"))
    prepare_pruning(a, WeightPruningConfig(pruning_type="sparse_gpt", target_sparsity=0.4, pattern="1x1"),
                    dataloader=batches)
    prunekit.oneshot(b, [{k: v for k, v in x.items() if k != "labels"} for x in batches],
                     {"method": "sparsegpt", "target_sparsity": 0.4}, progress=False)
    for (name, la), lb in zip(_linears(a).items(), _linears(b).values()):
        torch.testing.assert_close(la.weight, lb.weight, msg=name)


def test_sparse_gpt_config_errors_come_first():
    model = tiny_llm("llama")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ConfigError, match="pattern: got '4x1'"):
        prepare_pruning(model, WeightPruningConfig(pruning_type="sparse_gpt", pattern="4x1"), dataloader=_loader())
    with pytest.raises(ConfigError, match="dataloader"):
        prepare_pruning(model, WeightPruningConfig(pruning_type="sparse_gpt", pattern="1x1", target_sparsity=0.5))
    with pytest.raises(ConfigError, match="pruning_type: got 'sparse_gpt'"):
        prunekit.prepare_pruning(model, {"pruning_type": "sparse_gpt", "pattern": "1x1"},
                                 torch.optim.SGD(model.parameters(), lr=0.1))  # not a training-time criterion
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


@pytest.mark.parametrize("prune_n, prune_m", [(0, 0), (2, 4)])
def test_prune_wanda_call_shape(prune_n, prune_m):
    model = tiny_llm("opt", layers=2)
    report = prune_wanda(model, _loader("tuple", n=4), sparsity_ratio=0.5, prune_n=prune_n, prune_m=prune_m,
                         nsamples=2, use_variant=False, device="cpu", low_mem_usage=True, dsnot=False)
    assert report.nsamples == 2 and report.method == "wanda"
    for name, module in _linears(model).items():
        w = module.weight
        if prune_n:
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name
        else:
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name


def test_prune_wanda_refuses_half_an_nm_pattern():
    with pytest.raises(ConfigError, match="prune_n"):
        prune_wanda(tiny_llm("llama"), _loader(), 0.5, prune_n=2)
