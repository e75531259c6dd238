"""Example inputs for tracing: given by the user, taken from a dataloader batch, or built from the model."""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from prunekit.errors import SlimmingError

DUMMY_TOKENS = 8


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def detach_inputs(inputs: Any) -> Any:
    """Plain (non-inference) copies of every tensor, so autograd may save them during tracing."""
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().clone()
    if isinstance(inputs, dict):
        return {k: detach_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(detach_inputs(v) for v in inputs)
    return inputs


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def dummy_inputs(model: nn.Module) -> Any:
    """A tiny input the model accepts: from a transformers config when there is one, else from the first layer.

    Raises SlimmingError (asking for ``example_inputs``) when nothing sensible can be built.
    """
    device = _device(model)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    generator = torch.Generator().manual_seed(0)
    if config is not None and main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        inputs: dict[str, Any] = {
            "input_ids": torch.randint(0, vocab, (1, DUMMY_TOKENS), generator=generator).to(device),
            "attention_mask": torch.ones(1, DUMMY_TOKENS, dtype=torch.long, device=device),
        }
        if _accepts(model, "use_cache"):
            inputs["use_cache"] = False  # a KV cache concatenates past keys into the graph
        return inputs
    if config is not None and main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else int(size[0])
        channels = int(getattr(config, "num_channels", 3))
        return {"pixel_values": torch.randn(1, channels, size, size, generator=generator).to(device)}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (1, DUMMY_TOKENS), generator=generator).to(device)
        if isinstance(module, nn.Linear):
            return torch.randn(1, DUMMY_TOKENS, module.in_features, generator=generator).to(device)
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, 32, 32, generator=generator).to(device)
    raise SlimmingError(
        f"cannot build an example input for {type(model).__name__}; pass example_inputs= (a tensor, tuple or dict)")


def from_batch(batch: Any, model: nn.Module) -> Any:
    """Example inputs from one dataloader batch: dict batches keep their tensor entries (labels dropped),
    tuple batches give their first tensor."""
    device = _device(model)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        tensors = {k: v.to(device) for k, v in dict(batch).items()
                   if isinstance(v, torch.Tensor) and k not in ("labels", "label", "start_positions",
                                                                 "end_positions")}
        if _accepts(model, "use_cache"):
            tensors["use_cache"] = False
        return tensors
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].to(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    raise SlimmingError(f"cannot use a dataloader batch of type {type(batch).__name__} as model input")


def resolve_inputs(model: nn.Module, example_inputs: Any = None, dataloader: Iterable | None = None) -> Any:
    """``example_inputs`` if given, else the first dataloader batch, else :func:`dummy_inputs`."""
    if example_inputs is not None:
        return example_inputs
    if dataloader is not None:
        for batch in dataloader:
            return from_batch(batch, model)
    return dummy_inputs(model)
