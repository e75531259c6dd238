"""Tiny models and data locations for tests and smoke runs of the recipes."""
from __future__ import annotations

import os
from pathlib import Path

#: Offline BERT (3 layers, hidden 384) whose config and tokenizer the tiny test models reuse.
SHARED_MODEL = "paraphrase-minilm-l3"


def shared_root() -> Path:
    """``<repo>/../shared`` (the project's shared folder), as seen from a source checkout."""
    return Path(__file__).resolve().parents[3].parent / "shared"


def shared_data_dir() -> Path:
    """Local GLUE / SQuAD copies for tests and benchmarks: ``$PRUNEKIT_DATA_DIR``, else ``../shared/data``."""
    return Path(os.environ.get("PRUNEKIT_DATA_DIR") or shared_root() / "data")


def shared_model_dir(name: str = SHARED_MODEL) -> Path:
    return Path(os.environ.get("PRUNEKIT_MODELS_DIR") or shared_root() / "models") / name


def make_tiny_bert(dst: str | os.PathLike, src: str | os.PathLike | None = None, *, hidden_size: int = 32,
                   num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64, num_labels: int = 2,
                   seed: int = 0) -> Path:
    """A randomly initialised BERT with ``src``'s config shrunk and ``src``'s real tokenizer, saved to ``dst``.

    Saved as a sequence classifier; ``AutoModelForQuestionAnswering`` loads it too (with a fresh QA head).
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    src = Path(src) if src is not None else shared_model_dir()
    dst = Path(dst)
    config = AutoConfig.from_pretrained(src)
    config.hidden_size = hidden_size
    config.num_hidden_layers = num_layers
    config.num_attention_heads = num_heads
    config.intermediate_size = intermediate_size
    config.num_labels = num_labels
    config.max_position_embeddings = min(getattr(config, "max_position_embeddings", 512), 512)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst
