"""The real SmolLM2-135M end to end through ``prunekit oneshot`` at a small budget; plain transformers reloads it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from prunekit.cli import main
from llm_fixtures import smollm2_dir

SQUAD = Path(os.environ.get("PRUNEKIT_DATA_DIR", "/work/shared/data")) / "squad" / "dev-v1.1.json"


@pytest.mark.slow
def test_smollm2_sparsegpt_2of4_cli_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = smollm2_dir()
    if not SQUAD.is_file():
        pytest.skip(f"SQuAD dev file not found at {SQUAD} (set PRUNEKIT_DATA_DIR)")
    out = tmp_path / "smollm2-2of4"
    rc = main(["oneshot", "--model", str(model_dir), "--method", "sparsegpt", "--pattern", "2:4",
               "--calibration", str(SQUAD), "--nsamples", "4", "--seqlen", "64", "--seed", "0",
               "--output", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["sparsity"]["layers"]) == 30 * 7 and report["streamed"]
    pruned = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    for block in (pruned.model.layers[0], pruned.model.layers[29]):
        for module in (block.self_attn.k_proj, block.mlp.down_proj):
            w = module.weight
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all())
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # tied, as the input checkpoint
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    ids = torch.arange(100, 140).unsqueeze(0)
    assert torch.isfinite(pruned(input_ids=ids).logits).all()
