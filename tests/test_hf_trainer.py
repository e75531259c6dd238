"""prunekit.integrations.transformers.PruningCallback with a real Hugging Face Trainer on a tiny model."""
import pytest
import torch

from prunekit.recipes.testing import make_tiny_bert, shared_model_dir

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not shared_model_dir().is_dir(), reason="shared model not found")

SENTENCES = ["a charming and affecting journey", "bleak and desperate", "the best film of the year",
             "a dull , lifeless mess", "funny and touching", "boring from start to finish"] * 8


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.enc = tokenizer(SENTENCES, truncation=True, max_length=16, padding="max_length")
        self.labels = [i % 2 == 0 for i in range(len(SENTENCES))]

    def __len__(self):
        return len(SENTENCES)

    def __getitem__(self, i):
        item = {k: torch.tensor(v[i]) for k, v in self.enc.items()}
        item["labels"] = torch.tensor(int(self.labels[i]))
        return item


def _trainer(model_dir, out, callbacks, max_steps=12, save_steps=None, **kw):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=max_steps,
                             learning_rate=1e-3, logging_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             dataloader_num_workers=0, seed=0, **kw)
    return Trainer(model=model, args=args, train_dataset=TinyDataset(tok), callbacks=callbacks), model


CONFIG = {"target_sparsity": 0.8, "pattern": "4x1", "pruning_type": "snip_momentum", "start_step": 2,
          "end_step": 8, "pruning_frequency": 2, "excluded_op_names": ["classifier", "pooler"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def test_trainer_prunes_with_one_line(tiny, tmp_path):
    from prunekit.integrations.transformers import PruningCallback

    callback = PruningCallback(CONFIG)
    trainer, model = _trainer(tiny, tmp_path / "out", [callback])
    trainer.train()
    assert callback.pruning.global_step == 12 == trainer.state.global_step
    assert callback.pruning.current_sparsity() == pytest.approx(0.8, abs=0.01)
    assert callback.report is not None and callback.report.pruned_layers_sparsity == pytest.approx(0.8, abs=0.01)
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert (w == 0).float().mean().item() > 0.5
    assert (model.classifier.weight != 0).all()
    logged = [h for h in trainer.state.log_history if "sparsity" in h]
    assert logged and logged[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    # saved with plain save_pretrained, loaded back by plain transformers, zeros intact
    trainer.save_model(str(tmp_path / "final"))
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert torch.equal(again.bert.encoder.layer[0].intermediate.dense.weight, w.detach())


def test_add_callback_with_gradient_accumulation(tiny, tmp_path):
    from prunekit.integrations.transformers import PruningCallback

    trainer, _ = _trainer(tiny, tmp_path / "out", [], max_steps=10, gradient_accumulation_steps=2)
    callback = PruningCallback(CONFIG)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.pruning.global_step == 10  # optimizer steps, not micro-batches


def test_checkpoint_holds_pruning_state_and_resume_continues(tiny, tmp_path, caplog):
    from prunekit.integrations.transformers import PruningCallback

    out = tmp_path / "out"
    trainer, _ = _trainer(tiny, out, [PruningCallback(CONFIG)], max_steps=6, save_steps=6)
    trainer.train()
    state_file = out / "checkpoint-6" / "pruning_state.pt"
    assert state_file.is_file()
    saved = torch.load(state_file, weights_only=True)  # plain data: loads without unpickling code
    assert saved["global_step"] == 6

    callback = PruningCallback(CONFIG)
    trainer2, _ = _trainer(tiny, out, [callback], max_steps=12)
    with caplog.at_level("INFO", logger="prunekit"):
        trainer2.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert "resumed pruning state" in caplog.text
    assert callback.pruning.global_step == 12
    assert callback.pruning.current_sparsity() == pytest.approx(0.8, abs=0.01)


def test_bad_config_fails_at_construction():
    from prunekit.errors import ConfigError
    from prunekit.integrations.transformers import PruningCallback

    with pytest.raises(ConfigError, match="target_sparsity"):
        PruningCallback({**CONFIG, "pattern": "2:4", "target_sparsity": 0.9})
