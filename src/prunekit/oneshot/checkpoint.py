"""Streaming a Hugging Face safetensors checkpoint block by block, and writing the result shard by shard.

The model is built as a skeleton whose parameters live on the meta device (buffers, such as rotary
frequency tables that checkpoints do not store, are computed for real at construction). Only the modules
outside the decoder stack (embeddings, final norm, lm_head, rotary tables) are materialised, for the capture of
block 0's inputs; then :class:`SafetensorsLayers` materialises block *i* from the files (one ``safe_open`` per
tensor, so no file stays mapped), the pipeline prunes it, and the block is written out as its own shard and its
memory released. Peak memory is one block plus the modules outside the stack plus the calibration
activations, whatever the depth.

The output is staged in a hidden directory next to ``output_dir`` and renamed at the end: an interrupted run
leaves neither a half-written output nor any change to the input.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.oneshot.structure import DecoderStructure, find_decoder

INDEX_NAME = "model.safetensors.index.json"
# files of a checkout that are weights (rewritten) rather than config/tokenizer files (copied)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local checkout, or (online) a hub id fetched with ``huggingface_hub.snapshot_download``."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError("model", str(model), "allowed: a Hugging Face model directory (config.json and "
                              "*.safetensors) or a hub id", "no config.json there")
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ConfigError("model", str(model), "allowed: an existing Hugging Face model directory or a hub id")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                              "*.jinja", "*.tiktoken"])
    except Exception as e:  # the hub's errors are many (offline, gated, missing): one line names the input
        raise ConfigError("model", str(model), "allowed: a local model directory or a reachable hub id",
                          (str(e).splitlines() or [type(e).__name__])[0]) from None
    return Path(local)


class Checkpoint:
    """A safetensors checkout read lazily: its config, a meta skeleton of the model and tensor access by name."""

    def __init__(self, directory: str | os.PathLike, dtype: str | None = None) -> None:
        import transformers

        self.dir = resolve_model_dir(directory)
        self.weight_map = self._weight_map()
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.dir)
        except Exception as e:  # noqa: BLE001 - any unreadable config is the same user error
            raise ConfigError("model", str(directory), "allowed: a directory whose config.json transformers reads",
                              (str(e).splitlines() or [type(e).__name__])[0]) from None
        stored = next(iter(self._dtypes()), torch.float32)
        self.dtype = _DTYPES[dtype] if dtype else stored
        self.model = self._skeleton(transformers)
        self.structure: DecoderStructure = find_decoder(self.model)  # SelectionError: no decoder layers
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""

    # ---- reading ---------------------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ConfigError("model", str(self.dir), "allowed: a directory holding *.safetensors weights",
                              "convert .bin checkpoints with transformers' save_pretrained first")
        from safetensors import safe_open

        mapping = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                mapping.update({k: f.name for k in handle.keys()})
        return mapping

    def _dtypes(self) -> Iterator[torch.dtype]:
        # the dtype of the first floating tensor of the checkpoint, read from one file's header
        from safetensors import safe_open

        first = next(iter(self.weight_map.values()))
        with safe_open(self.dir / first, framework="pt") as handle:
            for key in handle.keys():
                t = handle.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    yield dtype
                    return

    def _skeleton(self, transformers: Any) -> nn.Module:
        try:
            from accelerate import init_empty_weights
        except ImportError:
            raise ConfigError("model", str(self.dir), "streaming a checkpoint needs accelerate: "
                              "pip install 'prunekit[transformers]'") from None
        # parameters on meta, buffers real: rotary tables are computed here, checkpoints do not carry them
        try:
            with init_empty_weights(include_buffers=False):
                model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        except (ValueError, KeyError) as e:  # an architecture without a causal-LM class
            raise ConfigError("model", str(self.dir), "allowed: a causal LM architecture (AutoModelForCausalLM)",
                              (str(e).splitlines() or [type(e).__name__])[0]) from None
        return model.eval()

    def key_of(self, name: str) -> str | None:
        """The checkpoint key holding model tensor ``name`` (some checkpoints omit the base-model prefix)."""
        if name in self.weight_map:
            return name
        if self._prefix and name.startswith(self._prefix + "."):
            short = name[len(self._prefix) + 1:]
            if short in self.weight_map:
                return short
        return None

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor from its file (the file is mapped only for this read)."""
        from safetensors import safe_open

        with safe_open(self.dir / self.weight_map[key], framework="pt") as handle:
            t = handle.get_tensor(key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def materialise(self, module: nn.Module, prefix: str, device: torch.device | None,
                    pool: TensorPool | None = None) -> None:
        """Load every parameter (and stored buffer) of ``module`` (named ``prefix`` in the model) from the files,
        into storage taken from ``pool`` when it holds a tensor of the same shape."""
        for name, param in list(module.named_parameters(recurse=True, remove_duplicate=False)):
            full = f"{prefix}.{name}" if prefix else name
            key = self.key_of(full)
            if key is None:
                if self._tied(full):
                    continue
                raise ConfigError("model", str(self.dir), f"allowed: a checkpoint holding every weight of "
                                  f"{type(self.model).__name__}", f"{full} is missing")
            t = self.tensor(key, self.dtype)
            if tuple(t.shape) != tuple(param.shape):
                raise ConfigError("model", str(self.dir), "allowed: weights whose shapes match config.json",
                                  f"{key} has shape {tuple(t.shape)}, the config says {tuple(param.shape)}")
            t = t.to(device) if device else t
            if pool is not None:
                t = pool.fill(t)
            _set_tensor(module, name, nn.Parameter(t, requires_grad=False))
        for name, buf in list(module.named_buffers()):
            key = self.key_of(f"{prefix}.{name}" if prefix else name)
            if key is not None:
                _set_tensor(module, name, self.tensor(key, self.dtype).to(device or buf.device))
            elif device is not None and not buf.is_meta:
                _set_tensor(module, name, buf.to(device))

    def _tied(self, name: str) -> bool:
        """Whether ``name`` is the output embedding of a model whose config ties it to the input embedding."""
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        tie = getattr(self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config,
                      "tie_word_embeddings", False)
        return bool(tie) and out is not None and name == _name_of(self.model, out) + ".weight"

    def tie(self) -> None:
        """Point a tied output embedding at the (materialised) input embedding, as transformers does."""
        out = self.model.get_output_embeddings()
        if out is not None and self._tied(_name_of(self.model, out) + ".weight"):
            out.weight = self.model.get_input_embeddings().weight

    def aux_files(self) -> list[Path]:
        """Config, generation config and tokenizer files: everything at the top level that is not weights."""
        return [p for p in sorted(self.dir.iterdir()) if p.is_file() and p.name != INDEX_NAME
                and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith(".")]

    def keys_by_part(self) -> tuple[list[str], list[list[str]]]:
        """The checkpoint's keys, split into (outside the decoder stack, per block) by model name."""
        blocks: list[list[str]] = [[] for _ in range(len(self.structure))]
        rest: list[str] = []
        names = {self.key_of(n) or n: n for n, _ in _state_names(self.model)}
        for key in self.weight_map:
            name = names.get(key, key)
            index = self._block_of(name)
            (rest if index is None else blocks[index]).append(key)
        return rest, blocks

    def _block_of(self, name: str) -> int | None:
        head = self.structure.path + "." if self.structure.path else ""
        if not name.startswith(head):
            return None
        first = name[len(head):].split(".", 1)[0]
        return int(first) if first.isdigit() and int(first) < len(self.structure) else None

    def model_name(self, key: str) -> str:
        """The model's own name of checkpoint key ``key`` (the output uses the model's names)."""
        if self._prefix and not key.startswith(self._prefix + ".") and self.key_of(f"{self._prefix}.{key}") == key:
            return f"{self._prefix}.{key}"
        return key

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.dir)
        except Exception as e:  # noqa: BLE001
            raise ConfigError("tokenizer", str(self.dir), "allowed: a model directory with tokenizer files, or "
                              "token ids as calibration", (str(e).splitlines() or [type(e).__name__])[0]) from None


def _state_names(model: nn.Module) -> list[tuple[str, Any]]:
    return list(model.named_parameters(remove_duplicate=False)) + [
        (n, b) for n, b in model.named_buffers()]


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if leaf in target._parameters:
        target._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        target._buffers[leaf] = value


class TensorPool:
    """Storage of released block parameters, reused for the next block (decoder blocks share their shapes).

    Without it every block allocates and frees its weights afresh; glibc then serves later blocks from a
    fragmented heap and the RSS creeps up by a few MiB per block, so peak memory would grow with depth.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def put(self, t: torch.Tensor) -> None:
        self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t.detach())

    def fill(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in a pooled tensor of its shape (``t`` itself when the pool has none)."""
        free = self._free.get((tuple(t.shape), t.dtype, t.device))
        if not free:
            return t
        target = free.pop()
        target.copy_(t)
        return target


def _load_malloc_trim() -> Any:
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A block's temporaries (float32 copies, masks, the serialised shard) are freed into the heap, and glibc keeps
    such holes resident; trimming after each block keeps the RSS at one block's worth instead of creeping up.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_parameters(module: nn.Module, pool: TensorPool | None = None) -> None:
    """Free ``module``'s parameters (they go back to meta, their storage to ``pool``); buffers stay."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                if pool is not None:
                    pool.put(p.data)
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def non_decoder_modules(model: nn.Module, structure: DecoderStructure) -> list[tuple[str, nn.Module]]:
    """(name, module) covering everything outside the decoder stack, smallest set."""
    out: list[tuple[str, nn.Module]] = []
    path = structure.path.split(".") if structure.path else []

    def walk(module: nn.Module, depth: int, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if depth < len(path) and name == path[depth]:
                if depth + 1 < len(path):
                    walk(child, depth + 1, full + ".")
            else:
                out.append((full, child))

    walk(model, 0, "")
    # parameters registered directly on a module along the path (rare) are loaded by the caller
    return out


class ShardWriter:
    """Writes a checkout into a hidden staging directory next to ``output``; :meth:`commit` renames it."""

    def __init__(self, output: str | os.PathLike, total_shards: int) -> None:
        self.output = Path(output)
        self.staging = self.output.parent / f".{self.output.name}.partial-{os.getpid()}"
        self.total = total_shards
        self.count = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def __enter__(self) -> ShardWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One shard: ``model-0000k-of-0000n.safetensors``."""
        from safetensors.torch import save_file

        self.count += 1
        name = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.staging / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self, aux_files: list[Path], dtype: torch.dtype | None = None, extra: Any = None) -> Path:
        """Index, config and tokenizer files, then the rename that makes the output appear at once."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
        for f in aux_files:
            shutil.copy2(f, self.staging / f.name)
        if dtype is not None:
            _set_config_dtype(self.staging / "config.json", dtype)
        if extra is not None:
            extra(self.staging)
        os.rename(self.staging, self.output)
        return self.output


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = name
    if "torch_dtype" not in data and "dtype" not in data:
        data["torch_dtype"] = name
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_dir(output: str | os.PathLike) -> Iterator[Path]:
    """A hidden directory next to ``output``, renamed to it on success and removed on any error."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        os.rename(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class SafetensorsLayers:
    """A :class:`~prunekit.oneshot.pipeline.LayerSource` over a :class:`Checkpoint`: block *i* is read from the
    files when its turn comes, and (with a ``writer``) written out as one shard and freed after it."""

    def __init__(self, ckpt: Checkpoint, device: torch.device | None, writer: ShardWriter | None = None,
                 on_release: Any = None, on_rest: Any = None) -> None:
        """``on_release(index, block)`` runs before a block is written and freed, ``on_rest(model)`` after the
        capture, while the modules outside the stack are materialised (the report measures them there)."""
        self.ckpt, self.device, self.writer = ckpt, device, writer
        self.on_release, self.on_rest = on_release, on_rest
        self.structure = ckpt.structure
        self.rest_keys, self.block_keys = ckpt.keys_by_part()
        self.pool = TensorPool()

    def load(self, index: int) -> nn.Module:
        block = self.structure.layers[index]
        self.ckpt.materialise(block, self.structure.layer_name(index), self.device, self.pool)
        return block

    def release(self, index: int, block: nn.Module) -> None:
        if self.on_release is not None:
            self.on_release(index, block)  # the report measures the block before it goes
        if self.writer is not None:
            self.writer.write(self._tensors(self.block_keys[index], block, self.structure.layer_name(index)))
        release_parameters(block, self.pool)
        return_free_memory()

    def _tensors(self, keys: list[str], module: nn.Module | None, prefix: str) -> dict[str, torch.Tensor]:
        """Each checkpoint key's tensor: from the materialised module when it holds it, else from the file."""
        state = {}
        if module is not None:
            state = {(f"{prefix}.{k}" if prefix else k): v for k, v in module.state_dict().items()}
        out = {}
        for key in keys:
            name = self.ckpt.model_name(key)
            t = state.get(name)
            if t is None or t.is_meta:
                t = self.ckpt.tensor(key, self.ckpt.dtype)
            out[name] = t
        return out

    @contextlib.contextmanager
    def capture_scope(self) -> Iterator[None]:
        parts = non_decoder_modules(self.ckpt.model, self.structure)
        for name, module in parts:
            self.ckpt.materialise(module, name, self.device)
        self.ckpt.tie()
        try:
            yield
            if self.on_rest is not None:
                self.on_rest(self.ckpt.model)
            if self.writer is not None:
                self.writer.write(self._tensors(self.rest_keys, self.ckpt.model, ""))
        finally:
            for _, module in parts:
                release_parameters(module)
