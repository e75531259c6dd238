"""Perplexity of a causal LM on token windows: the one evaluator every LLM command and benchmark uses."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
               device: torch.device | str | None = None, progress: bool = False) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every predicted token of ``windows``.

    Each window is scored on its own (no context carried over), all ``seqlen - 1`` predictions counted.
    """
    from tqdm.auto import tqdm

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows: got shape {tuple(windows.shape)}; allowed: [n, seqlen] with seqlen >= 2")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch",
                              disable=not progress, dynamic_ncols=True):
                ids = windows[start:start + batch_size]
                if device is not None:
                    ids = ids.to(device)
                logits = _logits(model(input_ids=ids, use_cache=False))
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      ids[:, 1:].reshape(-1), reduction="sum")
                total += float(nll)
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
