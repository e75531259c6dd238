"""GLUE recipe: fine-tune / prune / distil a sequence classifier (the original ``run_glue_no_trainer.py``)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from prunekit.recipes.data import GlueTask, get_glue_task, load_glue, take
from prunekit.recipes.distill import glue_distill_loss
from prunekit.recipes.metrics import glue_metrics
from prunekit.recipes.runner import TaskSetup, run_recipe
from prunekit.recipes.train import DistEnv, ListDataset, predict

logger = logging.getLogger("prunekit.recipes")


def tokenize_glue(examples: Sequence[dict], tokenizer, max_length: int, pad_to_max_length: bool = False,
                  regression: bool = False) -> list[dict]:
    a = [ex["text_a"] for ex in examples]
    b = [ex["text_b"] for ex in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length,
                    padding="max_length" if pad_to_max_length else False)
    features = []
    for i, ex in enumerate(examples):
        feat = {k: enc[k][i] for k in enc.keys()}
        feat["labels"] = float(ex["label"]) if regression else int(ex["label"])
        features.append(feat)
    return features


def make_collate(tokenizer):
    def collate(features: list[dict]) -> dict:
        labels = [f["labels"] for f in features]
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
        return batch

    return collate


def glue_predictions(model, batch: dict, regression: bool) -> list:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if regression:
        return logits.squeeze(-1).float().tolist()
    return logits.argmax(-1).tolist()


def make_glue_task(args, tokenizer, env: DistEnv) -> TaskSetup:
    from transformers import AutoModelForSequenceClassification

    task: GlueTask = get_glue_task(args.task_name)
    raw = load_glue(task, args.data_dir)
    train = take(raw["train"], args.max_train_samples)
    val = take(raw["validation"], args.max_eval_samples)
    reg = task.is_regression
    train_ds = ListDataset(tokenize_glue(train, tokenizer, args.max_length, args.pad_to_max_length, reg))
    eval_ds = ListDataset(tokenize_glue(val, tokenizer, args.max_length, args.pad_to_max_length, reg))
    labels = [ex["label"] for ex in val]
    collate = make_collate(tokenizer)

    def task_loss(model, batch):
        return model(**batch).loss

    kind = args.distill_loss
    weight = args.distill_loss_weight
    temperature = args.distill_temperature

    def distill_loss(model, teacher, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = kind == "hidden_mse"
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=hidden)
        s_out = model(**inputs, output_hidden_states=hidden)
        return glue_distill_loss(kind, s_out, t_out, inputs.get("attention_mask"), weight, temperature, reg)

    def evaluate(model, env_: DistEnv) -> dict:
        preds = predict(model, eval_ds, args.per_device_eval_batch_size, collate, env_,
                        lambda m, b: glue_predictions(m, b, reg), progress=not args.disable_tqdm)
        return glue_metrics(task.name, preds, labels)

    distill_info = {"loss": kind, "replaces_task_loss": True}
    if kind == "logit_kl":
        distill_info["temperature"] = temperature
    return TaskSetup(
        name=f"glue/{task.name}", model_class=AutoModelForSequenceClassification,
        model_kwargs={"num_labels": task.num_labels}, primary_metric=task.metric, train_dataset=train_ds,
        train_collate=collate, task_loss=task_loss, distill_loss=distill_loss, evaluate=evaluate,
        distill_leaves_params_unused=(kind == "hidden_mse"),
        info={"train_examples": len(train), "eval_examples": len(val), "distillation": distill_info},
    )


def run_glue(args) -> dict:
    """Run the GLUE recipe with parsed ``args`` (see :func:`prunekit.recipes.args.glue_parser`)."""
    return run_recipe(args, make_glue_task)
