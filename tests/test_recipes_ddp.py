"""The GLUE recipe under torchrun: two CPU processes with DDP on gloo."""
import json
import os
import subprocess
import sys

import pytest
import torch

from prunekit.recipes.testing import make_tiny_bert, shared_data_dir, shared_model_dir

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "MRPC").is_dir() or not shared_model_dir().is_dir()
                                or not torch.distributed.is_available(), reason="shared data / model / gloo missing")


def test_two_process_gloo_prune_with_distillation(tmp_path):
    tiny = make_tiny_bert(tmp_path / "tiny")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prunekit.cli", "glue",
           "--model_name_or_path", str(tiny), "--task_name", "mrpc", "--data_dir", str(DATA),
           "--max_train_samples", "128", "--max_eval_samples", "50", "--max_length", "64",
           "--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--learning_rate", "1e-3",
           "--do_prune", "--target_sparsity", "0.75", "--pruning_pattern", "4x1", "--pruning_frequency", "1",
           "--sparsity_warm_epochs", "0.5", "--cooldown_epochs", "0.5", "--distill_loss_weight", "2",
           "--output_dir", str(out), "--num_threads", "1", "--disable_tqdm", "--cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["ddp_ranks_in_sync"] is True
    # 128 examples / (8 per process x 2 processes) = 8 steps per epoch
    assert m["steps"]["steps_per_epoch"] == 8 and m["steps"]["total_steps"] == 16
    assert (m["steps"]["start_step"], m["steps"]["end_step"]) == (4, 12)
    assert m["sparsity"]["pruned_layers"] == pytest.approx(0.75, abs=0.01)
    assert set(m["final"]) == {"accuracy", "f1", "combined_score"}
    assert (out / "model.safetensors").is_file() and (out / "pruning_state.pt").is_file()
    # one log, written by rank 0 only
    assert proc.stderr.count("final accuracy=") == 1
