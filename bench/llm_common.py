"""The one-shot LLM bench's data protocol and evaluator, shared by every tool it compares.

Bench-only and dependency-light (torch + transformers): it is imported both from the project venv
(bench/oneshot.py) and from the peer's own venv (bench/llmc_oneshot.py), so both tools calibrate on the same token
windows and every output is scored by the same code.

Protocol
  text        the Wikipedia paragraphs of SQuAD v1.1 dev (``$PRUNEKIT_DATA_DIR/squad/dev-v1.1.json``), in file
              order: articles 1-38 are calibration text, 39-48 held out; paragraphs joined with "\\n\\n"
  tokens      the model's own tokenizer, no special tokens added (no BOS), so every window is plain text
  calibration ``nsamples`` windows of ``seqlen`` tokens at random starts (torch.Generator seeded with ``seed``)
              in the concatenated calibration tokens
  evaluation  the first K consecutive, non-overlapping ``seqlen`` windows of the held-out tokens
  perplexity  exp(mean next-token NLL over all K * (seqlen - 1) predicted tokens), AutoModelForCausalLM in float32
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

CALIBRATION_ARTICLES = range(0, 38)  # articles 1-38 (0-based indices)
HELD_OUT_ARTICLES = range(38, 48)  # articles 39-48
SPLITS = {"calibration": CALIBRATION_ARTICLES, "heldout": HELD_OUT_ARTICLES}


def squad_dev_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/squad/dev-v1.1.json``; data_dir defaults to ``$PRUNEKIT_DATA_DIR``, else ``../shared/data``."""
    root = Path(data_dir or os.environ.get("PRUNEKIT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    path = root / "squad" / "dev-v1.1.json"
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD v1.1 dev file not found at {path}: set PRUNEKIT_DATA_DIR to the folder holding squad/")
    return path


def wiki_text(split: str, squad: dict[str, Any] | str | os.PathLike | None = None) -> str:
    """The paragraphs of one split ("calibration" or "heldout"), joined with a blank line.

    ``squad`` is the parsed SQuAD JSON, a path to it, or None for :func:`squad_dev_path`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed 'calibration' or 'heldout'")
    if not isinstance(squad, dict):
        with open(squad or squad_dev_path(), encoding="utf-8") as f:
            squad = json.load(f)
    articles = squad["data"]
    wanted = SPLITS[split]
    if len(articles) < wanted.stop:
        raise ValueError(f"the SQuAD file has {len(articles)} articles; split {split!r} needs {wanted.stop}")
    return "\n\n".join(p["context"] for i in wanted for p in articles[i]["paragraphs"])


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """1-D LongTensor of the text's token ids, without special tokens (long text is fine: no model call here)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows at random starts in ``ids`` (seeded, so both tools get the same ones)."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples={nsamples}, seqlen={seqlen}: both must be >= 1")
    if ids.numel() < seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive non-overlapping ``[count, seqlen]`` windows of ``ids``."""
    available = ids.numel() // seqlen
    if count < 1 or count > available:
        raise ValueError(f"eval windows={count}: the held-out text holds 1..{available} windows of {seqlen} tokens")
    return ids[: count * seqlen].view(count, seqlen).clone()


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp of the mean next-token NLL over every predicted token of ``windows`` (a causal LM, float32 logits)."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def load_causal_lm(path: str | os.PathLike) -> nn.Module:
    """A plain ``AutoModelForCausalLM`` in float32, eval mode (nothing but transformers needed to reload)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def decoder_linears(model: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    """Every nn.Linear except the output head: the layers a one-shot pruner is asked to prune."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            yield name, module


def nm_violations(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of m-groups (consecutive along the input dimension) holding fewer than n zeros."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        raise ValueError(f"input width {w.shape[1]} is not a multiple of m={m}")
    zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(dim=-1)
    return int((zeros < n).sum())


def sparsity_stats(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, Any]:
    """Exact zero fractions of the decoder Linears, their n:m check, and whether the head stayed dense."""
    per_layer, zeros, total, bad = {}, 0, 0, 0
    for name, lin in decoder_linears(model):
        z = int((lin.weight == 0).sum())
        per_layer[name] = z / lin.weight.numel()
        zeros += z
        total += lin.weight.numel()
        bad += nm_violations(lin.weight, n, m)
    head = getattr(model, "lm_head", None)
    values = list(per_layer.values())
    return {
        "linears": len(per_layer),
        "sparsity": zeros / total if total else 0.0,
        "min_layer_sparsity": min(values) if values else 0.0,
        "max_layer_sparsity": max(values) if values else 0.0,
        f"groups_below_{n}of{m}_zeros": bad,
        f"is_{n}:{m}": bad == 0,
        "lm_head_zeros": int((head.weight == 0).sum()) if isinstance(head, nn.Linear) else None,
        "per_layer": per_layer,
    }
