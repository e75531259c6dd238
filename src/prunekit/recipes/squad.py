"""SQuAD v1.1 recipe: fine-tune / prune / distil an extractive QA model (the original ``run_qa_no_trainer.py``).

Contexts longer than ``--max_seq_length`` are cut into windows that overlap by ``--doc_stride`` tokens; a
training window without the answer points at the CLS token. Evaluation picks, per question, the best span over
all windows (``--n_best_size`` starts and ends, spans up to ``--max_answer_length`` tokens) and scores it with
the official v1.1 exact match / F1.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from prunekit.recipes.common import RecipeError
from prunekit.recipes.data import load_squad, take
from prunekit.recipes.distill import qa_distill_loss
from prunekit.recipes.metrics import squad_evaluate
from prunekit.recipes.runner import TaskSetup, run_recipe
from prunekit.recipes.train import DistEnv, ListDataset, predict

logger = logging.getLogger("prunekit.recipes")


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise RecipeError("the SQuAD recipe needs a fast tokenizer (offset mappings); this model has only a slow one")
    if tokenizer.padding_side != "right":
        raise RecipeError("the SQuAD recipe expects right padding (the question comes first)")


def _windows(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool):
    """Question + context tokenised into overlapping windows: (encoding, window → example, offsets)."""
    _check_tokenizer(tokenizer)
    questions = [ex["question"].lstrip() for ex in examples]
    contexts = [ex["context"] for ex in examples]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_seq_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length" if pad_to_max_length else False)
    return enc, enc.pop("overflow_to_sample_mapping"), enc.pop("offset_mapping")


def prepare_train_features(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int,
                           pad_to_max_length: bool = False) -> list[dict]:
    """Tokenise question + context windows and locate the answer's start / end token in each window."""
    enc, sample_map, offsets_all = _windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    features = []
    for i, offsets in enumerate(offsets_all):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        seq_ids = enc.sequence_ids(i)
        ex = examples[sample_map[i]]
        answers = ex["answers"]
        start_pos = end_pos = cls_index
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            tok_start = 0
            while seq_ids[tok_start] != 1:
                tok_start += 1
            tok_end = len(input_ids) - 1
            while seq_ids[tok_end] != 1:
                tok_end -= 1
            if offsets[tok_start][0] <= start_char and offsets[tok_end][1] >= end_char:
                while tok_start < len(offsets) and seq_ids[tok_start] == 1 and offsets[tok_start][0] <= start_char:
                    tok_start += 1
                start_pos = tok_start - 1
                while seq_ids[tok_end] == 1 and offsets[tok_end][1] >= end_char:
                    tok_end -= 1
                end_pos = tok_end + 1
        feat = {k: enc[k][i] for k in enc.keys()}
        feat["start_positions"] = start_pos
        feat["end_positions"] = end_pos
        features.append(feat)
    return features


def prepare_eval_features(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int,
                          pad_to_max_length: bool = False) -> tuple[list[dict], list[dict]]:
    """Model inputs per window, and per window its example id and the context offsets (None outside it)."""
    enc, sample_map, offsets_all = _windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    features, meta = [], []
    for i, offsets in enumerate(offsets_all):
        seq_ids = enc.sequence_ids(i)
        features.append({k: enc[k][i] for k in enc.keys()})
        meta.append({"example_id": examples[sample_map[i]]["id"],
                     "offset_mapping": [o if seq_ids[k] == 1 else None for k, o in enumerate(offsets)]})
    return features, meta


def postprocess_predictions(examples: Sequence[dict], meta: Sequence[dict], start_logits: Sequence[np.ndarray],
                            end_logits: Sequence[np.ndarray], n_best_size: int = 20,
                            max_answer_length: int = 30) -> dict[str, str]:
    """``{question id: answer text}``: the best-scoring valid span (start + end logit) over all windows."""
    by_example: dict[str, list[int]] = {}
    for idx, m in enumerate(meta):
        by_example.setdefault(m["example_id"], []).append(idx)
    predictions = {}
    for ex in examples:
        best_score, best_text = None, ""
        context = ex["context"]
        for idx in by_example.get(ex["id"], []):
            offsets = meta[idx]["offset_mapping"]
            s_logits, e_logits = np.asarray(start_logits[idx]), np.asarray(end_logits[idx])
            n = min(len(offsets), len(s_logits))
            s_idx = np.argsort(s_logits[:n])[-1: -n_best_size - 1: -1]
            e_idx = np.argsort(e_logits[:n])[-1: -n_best_size - 1: -1]
            for s in s_idx:
                if offsets[s] is None:
                    continue
                for e in e_idx:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(s_logits[s] + e_logits[e])
                    if best_score is None or score > best_score:
                        best_score = score
                        best_text = context[offsets[s][0]: offsets[e][1]]
        predictions[ex["id"]] = best_text
    return predictions


def make_collate(tokenizer):
    position_keys = ("start_positions", "end_positions")

    def collate(features: list[dict]) -> dict:
        extra = {k: torch.tensor([f[k] for f in features], dtype=torch.long)
                 for k in position_keys if k in features[0]}
        batch = dict(tokenizer.pad([{k: v for k, v in f.items() if k not in position_keys} for f in features],
                                   return_tensors="pt"))
        batch.update(extra)
        return batch

    return collate


def qa_logits(model, batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
    out = model(**inputs)
    mask = inputs["attention_mask"].bool()
    res = []
    for i in range(out.start_logits.shape[0]):
        n = int(mask[i].sum())
        res.append((out.start_logits[i, :n].float().cpu().numpy(), out.end_logits[i, :n].float().cpu().numpy()))
    return res


def make_squad_task(args, tokenizer, env: DistEnv) -> TaskSetup:
    from transformers import AutoModelForQuestionAnswering

    if args.doc_stride >= args.max_seq_length:
        raise RecipeError(f"--doc_stride ({args.doc_stride}) must be smaller than --max_seq_length "
                          f"({args.max_seq_length})")
    _check_tokenizer(tokenizer)
    raw = load_squad(args.data_dir, train_file=args.train_file, validation_file=args.validation_file,
                     dev_derived_split=args.dev_derived_split)
    train = take(raw["train"], args.max_train_samples)
    val = take(raw["validation"], args.max_eval_samples)
    train_feats = prepare_train_features(train, tokenizer, args.max_seq_length, args.doc_stride,
                                         args.pad_to_max_length)
    eval_feats, eval_meta = prepare_eval_features(val, tokenizer, args.max_seq_length, args.doc_stride,
                                                  args.pad_to_max_length)
    train_ds, eval_ds = ListDataset(train_feats), ListDataset(eval_feats)
    collate = make_collate(tokenizer)
    weight, temperature = args.distill_loss_weight, args.distill_temperature

    def task_loss(model, batch):
        return model(**batch).loss

    def distill_loss(model, teacher, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        with torch.no_grad():
            t_out = teacher(**inputs)
        s_out = model(**inputs)
        return qa_distill_loss(s_out, t_out, inputs.get("attention_mask"), weight, temperature)

    def evaluate(model, env_: DistEnv) -> dict:
        outs = predict(model, eval_ds, args.per_device_eval_batch_size, collate, env_, qa_logits,
                       progress=not args.disable_tqdm)
        preds = postprocess_predictions(val, eval_meta, [o[0] for o in outs], [o[1] for o in outs],
                                        args.n_best_size, args.max_answer_length)
        return squad_evaluate(preds, val)

    return TaskSetup(
        name="squad" + ("-dev-derived" if args.dev_derived_split else ""),
        model_class=AutoModelForQuestionAnswering, model_kwargs={}, primary_metric="f1",
        train_dataset=train_ds, train_collate=collate, task_loss=task_loss, distill_loss=distill_loss,
        evaluate=evaluate, distill_leaves_params_unused=False, pruning_start_offset=args.num_warmup_steps,
        info={"train_examples": len(train), "eval_examples": len(val),
              "distillation": {"loss": "start/end KL", "temperature": temperature, "replaces_task_loss": True}},
    )


def run_squad(args) -> dict:
    """Run the SQuAD recipe with parsed ``args`` (see :func:`prunekit.recipes.args.squad_parser`)."""
    return run_recipe(args, make_squad_task)
