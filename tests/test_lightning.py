"""The Lightning callback prunes a real Lightning fit to its target and checkpoints the pruning state."""
import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from prunekit.integrations.lightning import PruningCallback  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_lightning_fit_reaches_target_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    callback = PruningCallback({"target_sparsity": 0.75, "pattern": "4x1", "start_step": 2, "end_step": 20,
                                "pruning_frequency": 6}, print_report=False)
    trainer = L.Trainer(max_steps=30, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        accumulate_grad_batches=2)
    trainer.fit(model, _loader())
    pruning = callback.pruning
    assert pruning.global_step == 30  # optimizer steps, not the 60 micro-batches
    assert pruning.current_sparsity() == pytest.approx(0.75, abs=0.01)
    for layer in pruning.layers:  # the zeros really are in the weights
        assert int((layer.weight == 0).sum()) == layer.zeros()
    assert (model.net[4].weight != 0).all()  # the output head is left dense
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    states = [v for k, v in ckpt["callbacks"].items() if "PruningCallback" in k]
    assert states and states[0]["global_step"] == 30
