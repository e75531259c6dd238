"""Files a run reads may be planted: loading them never runs code (torch.load is always weights_only=True)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import prunekit
from prunekit.safe_load import UnsafeFileError, load_torch_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"target_sparsity": 0.5, "pattern": "1x1", "pruning_type": "magnitude", "start_step": 0, "end_step": 4,
          "pruning_frequency": 1}


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "global_step": 3, "pruners": [], "payload": Payload(marker)}, path)
    return path


def test_the_planted_file_really_runs_code_when_unpickled(tmp_path):
    """Sanity: the payload is live, so the tests below would notice a weights_only=False load."""
    marker = tmp_path / "marker"
    torch.load(plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.read_text() == "code ran"


def test_safe_loader_refuses_code_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeFileError) as info:
        load_torch_file(plant(tmp_path / "x.pt", marker), "pruning state")
    message = str(info.value)
    assert "\n" not in message and "x.pt" in message and "exec" in message
    assert not marker.exists()


def test_safe_loader_reads_the_pruning_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruning = prunekit.prepare_pruning(model, CONFIG, opt)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    import io

    buffer = io.BytesIO()
    torch.save(pruning.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data only: tensors, numbers, strings, containers
    assert state["global_step"] == 3


def test_trainer_callback_resume_refuses_a_planted_state(tmp_path):
    """A pruning_state.pt planted in checkpoint-N/ is refused when PruningCallback resumes; no code runs."""
    pytest.importorskip("transformers")
    from prunekit.integrations.transformers import PruningCallback

    marker = tmp_path / "marker"
    plant(tmp_path / "out" / "checkpoint-3" / "pruning_state.pt", marker)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = PruningCallback(CONFIG)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"))
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    with pytest.raises(UnsafeFileError, match="pruning_state.pt"):
        callback.on_train_begin(args, state, SimpleNamespace(), model=model, optimizer=opt)
    assert not marker.exists()


def test_no_torch_load_without_weights_only_in_src_and_bench():
    """Every torch.load in the library and the benchmarks passes weights_only=True (or goes through
    prunekit.safe_load.load_torch_file)."""
    offenders = []
    for folder in ("src", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start(): text.find(")", match.start()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(REPO)}: {call}")
    assert not offenders, offenders
