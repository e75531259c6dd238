"""Saving and loading slimmed models with their per-layer shapes.

transformers models are written as their config (config.json carrying ``prunekit_slimming``) plus the model's
own state_dict in safetensors (``save_pretrained`` is not used for the weights: transformers 5 renames some
families' keys back to legacy names on save, e.g. ViT). :func:`load_slimmed` rebuilds the architecture from
the *original* scalar config values, cuts every recorded layer to its slimmed shape (the same cutting functions
as :func:`~prunekit.slimming.slim`), then loads the weights strictly. Plain ``nn.Module`` models are written as
``slimming.json`` + ``model.safetensors`` and loaded into a freshly built, unslimmed instance passed as
``model=``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import SlimmingError
from prunekit.slimming.apply import cut_attention, cut_ffn
from prunekit.slimming.groups import AttentionGroup, FFNGroup, resized
from prunekit.slimming.hf_config import ENTRY, read_record
from prunekit.slimming.layers import layer_ops
from prunekit.slimming.plan import AttentionCut, FFNCut

RECORD_FILE = "slimming.json"
WEIGHTS_FILE = "model.safetensors"
_GROUP_FIELDS = set(AttentionGroup.__dataclass_fields__)


def save_slimmed(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (slimmed or not) to the directory ``path``; returns the path."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        # the class it is, always: a classifier made from a base checkpoint still names the base class, and
        # load_slimmed builds what this says (transformers' save_pretrained overwrites it the same way)
        config.architectures = [type(model).__name__]
        config.save_pretrained(path)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(path)
    else:
        (path / RECORD_FILE).write_text(json.dumps(read_record(model) or {}, indent=1))
    # save_model writes tied/shared tensors once; "format": "pt" is what transformers' loader expects.
    save_model(model, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def resize_to_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Cut a freshly built (unslimmed) ``model`` to the shapes in a slimming record (weights are not kept)."""
    with torch.no_grad():
        for entry in record.get("ffn", []):
            consumer = model.get_submodule(entry["consumer"])
            built = layer_ops(consumer).in_features(consumer)
            if entry["width"] > built:
                raise SlimmingError(f"{entry['consumer']}: record says width {entry['width']}, model has {built}")
            if entry["width"] != built:
                group = FFNGroup(entry["name"], list(entry["producers"]), entry["consumer"], built, entry["source"])
                cut_ffn(model, FFNCut(group, torch.arange(entry["width"]), []))
        for entry in record.get("attention", []):
            slimmed = AttentionGroup.from_dict({k: v for k, v in entry.items() if k in _GROUP_FIELDS})
            group = resized(slimmed, entry["original_num_heads"], entry["original_num_kv_heads"])
            if (slimmed.num_heads, slimmed.num_kv_heads) == (group.num_heads, group.num_kv_heads):
                continue
            per_kv = slimmed.heads_per_kv
            keep_kv = list(range(slimmed.num_kv_heads))
            keep_heads = [h for g in keep_kv for h in group.query_heads_of(g)[:per_kv]]
            cut_attention(model, AttentionCut(group, keep_heads, keep_kv, []))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / f"{WEIGHTS_FILE}.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if not (path / WEIGHTS_FILE).exists():
        raise SlimmingError(f"{path}: no {WEIGHTS_FILE} (save with prunekit.slimming.save_slimmed)")
    return load_file(str(path / WEIGHTS_FILE))


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise SlimmingError(f"checkpoint does not match the rebuilt model: missing {missing[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameters that share storage with another one (written once by safetensors)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr()
        if key in seen:
            tied.update({name, seen[key]})
        seen[key] = name
    return tied


def _build_transformers(path: Path, **config_overrides: Any) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, **config_overrides)
    record = getattr(config, ENTRY, None) or {}
    build_config = copy.deepcopy(config)
    for name, value in record.get("original", {}).items():
        setattr(build_config, name, value)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise SlimmingError(f"{path}: config.architectures {architectures} names no transformers class")
    model = cls(build_config)
    resize_to_record(model, record)
    for name in record.get("original", {}):
        setattr(model.config, name, getattr(config, name))
    setattr(model.config, ENTRY, record)
    return model


def load_slimmed(path: str | Path, model: nn.Module | None = None, **config_overrides: Any) -> nn.Module:
    """Load a model written by :func:`save_slimmed`, per-layer widths and removed heads included.

    Without ``model`` the directory must hold a transformers checkpoint (config.json); the class is taken from
    ``config.architectures``. With ``model`` (a freshly built, unslimmed instance), its layers are cut to the
    recorded shapes and the weights loaded into it. Returns the model in eval mode.
    """
    path = Path(path)
    if model is None:
        if not (path / "config.json").exists():
            raise SlimmingError(f"{path}: no config.json; pass the unslimmed model as model= to load into it")
        model = _build_transformers(path, **config_overrides)
    else:
        record_file = path / RECORD_FILE
        if record_file.exists():
            record = json.loads(record_file.read_text())
        else:
            import transformers

            config = transformers.AutoConfig.from_pretrained(path)
            record = getattr(config, ENTRY, None) or {}
        resize_to_record(model, record)
        holder = model.config if getattr(model, "config", None) is not None else model
        setattr(holder, ENTRY, record)
    _load_state(model, _read_weights(path))
    return model.eval()
