"""Tiny random decoder LLMs (Llama with GQA, GPT-2, OPT, Qwen2) and the real SmolLM2 path, for one-shot tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SMOLLM2_DIR = Path(os.environ.get("PRUNEKIT_SMOLLM2_DIR",
                                  Path.home() / ".cache" / "prunekit-models" / "smollm2-135m"))


def tiny_llm(kind: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small random causal LM of family ``kind`` (llama, qwen2, mistral, gpt2, opt), float32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128)
    if kind in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[kind]
        config = cls(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **common)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, **common)
    elif kind == "opt":
        config = tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=layers, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=64, **common)
    else:
        raise ValueError(kind)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def smollm2_dir() -> Path:
    """The real SmolLM2-135M directory, or skip (CI builds it with ../shared/models/build_smollm2.py)."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"SmolLM2-135M not built at {SMOLLM2_DIR} (set PRUNEKIT_SMOLLM2_DIR)")
    return SMOLLM2_DIR


def char_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer with ids < ``vocab_size`` (for text calibration of tiny models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + vocab_size - 2)]
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def tiny_checkpoint(directory: Path, kind: str = "llama", layers: int = 2, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None) -> Path:
    """``tiny_llm(kind, layers)`` saved as a Hugging Face safetensors checkout with a character tokenizer."""
    model = tiny_llm(kind, layers).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    char_tokenizer().save_pretrained(directory)
    return Path(directory)
