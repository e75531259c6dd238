"""End to end with prunekit's own engine: auto_slim_configs -> prepare_pruning -> train -> detach -> slim."""
from __future__ import annotations

import pytest
import torch

from prunekit.pruning import prepare_pruning
from prunekit.slimming import auto_slim_configs, slim
from test_slim_fixtures import FAMILIES, FFN, HEADS, inputs_for, outputs


def _pruned(family: str):
    model = FAMILIES[family]()
    x = inputs_for(family)
    configs = auto_slim_configs(model, ffn2_sparsity=0.5, mha_sparsity=0.5, pruning_type="magnitude",
                                pruning_scope="local", start_step=0, end_step=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    pruning = prepare_pruning(model, configs, optimizer)
    model.train()
    for _ in range(2):
        out = model(**x)
        loss = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), pruning, x


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_pruned_model_slims_to_the_target(family: str) -> None:
    model, pruning, x = _pruned(family)
    pruning.detach(remove_masks=True)  # optional once the schedule has finished (see test_original_flows.py)
    expected = outputs(model, x)
    report = slim(model)
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)
    assert [f.width_after for f in report.ffn] == [FFN // 2] * 2
    assert [a.heads_after for a in report.attention] == [HEADS // 2] * 2
