"""The sequential, layer-by-layer calibration pipeline that every one-shot method runs inside.

It owns the model plumbing so a method only ever sees one decoder block and that block's inputs:

1. capture what the model passes to block 0 for every calibration batch: the hidden states and *every*
   positional and keyword extra of that batch (attention mask, position ids, rotary embeddings, ...), with the
   KV cache off (the original reused the first batch's positional extras for every batch);
2. for each block in turn: put it on the device, hand a :class:`LayerContext` to the method (which collects
   input statistics of the block's linears and prunes), then run the pruned block on the captured inputs to make
   the next block's inputs, and release the block.

Where blocks come from and go to is a :class:`LayerSource`: :class:`InMemoryLayers` moves a loaded model's
blocks to the device one at a time; a streaming source can materialise each block from safetensors files and
write it out, so peak memory does not grow with depth.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import DecoderStructure, find_decoder


class _StopForward(Exception):
    """Raised from block 0's pre-hook: everything after it is not needed for the capture."""


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """What one calibration batch passes to a decoder block: hidden states plus every other argument."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _hidden_of(output: Any) -> torch.Tensor:
    # Llama-style blocks return the hidden states, GPT-2 / OPT-style ones a tuple starting with them
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a decoder block returned {type(output).__name__}; expected a tensor or a tuple of them")


def _as_model_inputs(batch: Any) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    if isinstance(batch, Mapping):
        return dict(batch)
    raise TypeError(f"calibration batch: got {type(batch).__name__}; allowed: a LongTensor of token ids "
                    "[batch, seq] or a dict with 'input_ids' (and optionally 'attention_mask')")


def capture_block_inputs(model: nn.Module, structure: DecoderStructure, batches: Iterable[Any],
                         device: torch.device | str | None = None,
                         cache_device: torch.device | str | None = None) -> list[BlockInputs]:
    """Run ``model`` on each batch up to block 0 and record that block's inputs, one entry per batch."""
    captured: list[BlockInputs] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        # a cache object would grow across batches and blocks; the pipeline runs every block without one
        for key in ("past_key_value", "past_key_values", "cache", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append(BlockInputs(to_device(hidden.detach(), cache_device), to_device(rest, cache_device),
                                    to_device(kwargs, cache_device)))
        raise _StopForward

    handle = structure.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = to_device(_as_model_inputs(batch), device)
                try:
                    model(**inputs, use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover - a model that never calls its first block
                    raise RuntimeError("the model's forward never reached its first decoder block")
    finally:
        handle.remove()
    return captured


MICRO_BATCH_TOKENS = 2048  # a CPU block forward on 4 x 512 tokens at once is ~10 % cheaper per token than 4 x 1


def micro_batches(batches: list[Any], max_tokens: int = MICRO_BATCH_TOKENS) -> list[Any]:
    """Consecutive ``[1, L]`` token-id windows of equal length stacked into ``[k, L]`` batches (k·L <= max_tokens).

    The statistics the pipeline collects are per token, so they do not depend on the batching; a user's dict
    batches (which may carry their own masks) pass through unchanged.
    """
    out: list[Any] = []
    group: list[torch.Tensor] = []

    def flush() -> None:
        if group:
            out.append(torch.cat(group) if len(group) > 1 else group[0])
            group.clear()

    for b in batches:
        plain = isinstance(b, torch.Tensor) and b.dim() == 2 and b.shape[0] == 1
        if not plain or (group and (b.shape[1] != group[0].shape[1]
                                    or (len(group) + 1) * b.shape[1] > max_tokens)):
            flush()
        if plain:
            group.append(b)
        else:
            out.append(b)
    flush()
    return out


class LayerContext:
    """One decoder block during the sequential pass: the block (on the device) and its calibration inputs."""

    def __init__(self, index: int, name: str, block: nn.Module, inputs: list[BlockInputs],
                 device: torch.device | str | None) -> None:
        self.index, self.name, self.block, self.inputs, self.device = index, name, block, inputs, device

    def _call(self, block: nn.Module, b: BlockInputs) -> Any:
        """``block`` on one captured batch, its arguments moved to the device (the caller holds no_grad)."""
        return block(to_device(b.hidden, self.device), *to_device(b.args, self.device),
                     **to_device(b.kwargs, self.device))

    def forward(self, block: nn.Module | None = None) -> list[torch.Tensor]:
        """The block's hidden-state output for every calibration batch (no grad)."""
        block = self.block if block is None else block
        with torch.no_grad():
            return [_hidden_of(self._call(block, b)).to(b.hidden.device) for b in self.inputs]

    def collect(self, linears: Mapping[str, nn.Module], kinds: Iterable[str], stop_early: bool = False,
                shared: Iterable[Iterable[str]] = ()) -> dict[str, InputStats]:
        """Run the block once and accumulate ``kinds`` statistics of the inputs of each of ``linears``.

        ``shared``: groups of names that read the same tensor (:meth:`input_groups`); each group's members get
        one :class:`InputStats`, accumulated once (q/k/v share one Hessian). ``stop_early``: a batch's forward
        stops as soon as every one of ``linears`` has been handed it (the rest of the block is not needed).
        """
        kinds = tuple(kinds)
        leader = {n: n for n in linears}
        for group in shared:
            members = [n for n in group if n in linears]
            leader.update({n: members[0] for n in members})
        stats: dict[str, InputStats] = {}
        handles = []
        seen: set[str] = set()
        for name, module in linears.items():
            if leader[name] != name:
                continue
            in_features = module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]
            stats[name] = InputStats(in_features, kinds, module.weight.device)

            # a pre-hook: with stop_early the forward ends before the last linear's own matmul
            def hook(_m: nn.Module, args: tuple, s: InputStats = stats[name], n: str = name) -> None:
                s.add(args[0])
                seen.add(n)
                if stop_early and len(seen) == len(stats):
                    raise _StopForward

            handles.append(module.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                for b in self.inputs:
                    seen.clear()
                    try:
                        self._call(self.block, b)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        return {name: stats[leader[name]] for name in linears}

    def input_groups(self, linears: Mapping[str, nn.Module]) -> list[list[str]]:
        """``linears`` grouped by the tensor they read, in the order the block uses them.

        For a Llama block: ``[q, k, v], [o], [gate, up], [down]``. Found by running the first calibration batch
        once and comparing the input tensors each linear receives.
        """
        groups: dict[int, list[str]] = {}  # id of the input tensor -> linears reading it, in call order
        keep_alive: list[torch.Tensor] = []  # no input is freed during the probe, so no id is reused
        placed: set[str] = set()
        handles = []
        for name, module in linears.items():
            def hook(_m: nn.Module, args: tuple, n: str = name) -> None:
                if n not in placed:  # a linear called twice keeps its first group
                    placed.add(n)
                    keep_alive.append(args[0])
                    groups.setdefault(id(args[0]), []).append(n)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                self._call(self.block, self.inputs[0])
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in linears if n not in placed]
        return list(groups.values()) + ([missing] if missing else [])


class LayerSource(Protocol):
    """Where the blocks of the sequential pass come from and where they go after it."""

    def load(self, index: int) -> nn.Module:
        """Block ``index``, ready on the compute device."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is done (pruned): store it and free the device."""

    @contextlib.contextmanager
    def capture_scope(self) -> Iterator[None]:
        """The modules before block 0 (embeddings, rotary tables) are usable on the device inside this scope."""


class InMemoryLayers:
    """Blocks of a model that is already loaded: each is moved to the device for its turn, then back."""

    def __init__(self, model: nn.Module, structure: DecoderStructure,
                 device: torch.device | str | None = None) -> None:
        self.model, self.structure, self.device = model, structure, device
        self._home: dict[int, torch.device] = {}

    def load(self, index: int) -> nn.Module:
        block = self.structure.layers[index]
        first = next(block.parameters(), None)
        self._home[index] = first.device if first is not None else torch.device("cpu")
        return block.to(self.device) if self.device is not None else block

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index, torch.device("cpu")))

    @contextlib.contextmanager
    def capture_scope(self) -> Iterator[None]:
        if self.device is None:
            yield
            return
        # only what runs before block 0 moves: every top-level child that is not the decoder stack's branch
        moved = _non_decoder_modules(self.model, self.structure)
        homes = []
        for m in moved:
            t = next(m.parameters(), None)
            t = next(m.buffers(), None) if t is None else t
            homes.append(t.device if t is not None else None)
            m.to(self.device)
        try:
            yield
        finally:
            for m, home in zip(moved, homes):
                if home is not None:
                    m.to(home)


def _non_decoder_modules(model: nn.Module, structure: DecoderStructure) -> list[nn.Module]:
    """The smallest set of submodules that covers everything outside the decoder stack."""
    out: list[nn.Module] = []
    path = structure.path.split(".") if structure.path else []

    def walk(module: nn.Module, depth: int) -> None:
        for name, child in module.named_children():
            if depth < len(path) and name == path[depth]:
                if depth + 1 < len(path):
                    walk(child, depth + 1)
            else:
                out.append(child)

    walk(model, 0)
    return out


LayerFn = Callable[[LayerContext], None]


def run_sequential(model: nn.Module, batches: Iterable[Any], on_layer: LayerFn, *,
                   structure: DecoderStructure | None = None, source: LayerSource | None = None,
                   device: torch.device | str | None = None, cache_device: torch.device | str | None = None,
                   progress: bool = True, desc: str = "layers") -> DecoderStructure:
    """Capture block 0's inputs, then for each block: ``on_layer(ctx)``, run the block to feed the next one.

    ``device`` is where each block computes (one block there at a time); ``cache_device`` where the captured
    activations wait between blocks (default: ``device``). Returns the decoder structure that was walked.
    """
    structure = structure or find_decoder(model)
    source = source or InMemoryLayers(model, structure, device)
    cache_device = cache_device if cache_device is not None else device
    was_training = model.training
    model.eval()
    try:
        with source.capture_scope():
            inputs = capture_block_inputs(model, structure, batches, device, cache_device)
        if not inputs:
            raise ValueError("calibration: no batches were given")
        bar = _progress(len(structure), desc, progress)
        for index in range(len(structure)):
            block = source.load(index)
            ctx = LayerContext(index, structure.layer_name(index), block, inputs, device)
            on_layer(ctx)
            if index + 1 < len(structure):  # the last block's outputs feed nothing
                outputs = ctx.forward()
                inputs = [BlockInputs(o, b.args, b.kwargs) for b, o in zip(inputs, outputs)]
            source.release(index, block)
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    return structure


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, dynamic_ncols=True)
