"""``prunekit.oneshot(model_or_path, calibration, config)``: one-shot pruning of a decoder LLM.

Everything is validated before any work: the config, the output directory (must not exist), the model (must
have decoder blocks), the layer selection and the calibration data (long enough for one sample). A loaded
``nn.Module`` is pruned in place (its blocks visit the device one at a time); a path or hub id is streamed
from its safetensors files block by block and written out shard by shard (prunekit.oneshot.checkpoint).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.masks import drop_masks
from prunekit.oneshot.checkpoint import (Checkpoint, SafetensorsLayers, ShardWriter, return_free_memory,
                                         staged_dir)
from prunekit.oneshot.config import OneShotConfig, load_oneshot_config
from prunekit.oneshot.data import calibration_windows, load_texts
from prunekit.oneshot.methods import METHODS
from prunekit.oneshot.pipeline import InMemoryLayers, LayerContext, LayerSource, micro_batches, run_sequential
from prunekit.oneshot.prune import Selection, prune_block, select_linears
from prunekit.oneshot.report import OneShotReport, gpu_peak, peak_rss_bytes
from prunekit.oneshot.structure import DecoderStructure, find_decoder
from prunekit.report import SparsityReport, sparsity_report

Calibration = Any  # LongTensor [n, seqlen] | list of texts | path / dataset name | iterable of batches


def resolve_device(device: str | None) -> torch.device:
    """The compute device: the config's, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", device, "allowed: cpu (no CUDA device is available)")
    return dev


def check_output_dir(output_dir: str | os.PathLike | None) -> Path | None:
    """The output directory must not exist yet: nothing a user saved is overwritten."""
    if output_dir is None:
        return None
    path = Path(output_dir)
    if path.exists():
        raise ConfigError("output_dir", str(path), "allowed: a directory that does not exist yet "
                          "(prunekit never overwrites a saved model)")
    return path


def calibration_batches(calibration: Calibration, config: OneShotConfig, tokenizer: Any | None,
                        tokenizer_factory: Callable[[], Any] | None = None, *, split: str = "train",
                        text_column: str = "text") -> list[Any]:
    """Calibration data as model batches, one sample each: token windows ``[1, seqlen]`` or the user's dicts."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
                or calibration.dim() not in (1, 2) or calibration.shape[-1] < 2 or calibration.numel() == 0:
            raise ConfigError("calibration", f"tensor {tuple(calibration.shape)} {calibration.dtype}",
                              "allowed: integer token ids [nsamples, seqlen] with seqlen >= 2")
        windows = calibration if calibration.dim() == 2 else calibration.unsqueeze(0)
        windows = windows[: config.nsamples, : config.seqlen].long()
        return [w.unsqueeze(0) for w in windows]
    if isinstance(calibration, (list, tuple)) and calibration and not isinstance(calibration[0], str):
        return list(calibration)  # already batches (dicts with input_ids, or id tensors)
    if isinstance(calibration, (str, os.PathLike, list, tuple)):
        texts = load_texts(calibration, split=split, text_column=text_column)
        if tokenizer is None:
            if tokenizer_factory is None:
                raise ConfigError("tokenizer", None, "allowed: a tokenizer, needed to cut text into windows "
                                  "(or pass token ids [nsamples, seqlen] as calibration)")
            tokenizer = tokenizer_factory()
        windows = calibration_windows(texts, tokenizer, config.nsamples, config.seqlen, config.seed)
        return [w.unsqueeze(0) for w in windows]
    if isinstance(calibration, Iterable):
        return list(calibration)
    raise ConfigError("calibration", type(calibration).__name__, "allowed: token ids [n, seqlen], a list of "
                      "texts, a .txt/.jsonl/SQuAD .json file, a dataset name, or a list of batches")


def _batch_shape(batches: Sequence[Any]) -> tuple[int, int]:
    first = batches[0]
    ids = first.get("input_ids") if isinstance(first, dict) else first
    seqlen = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0
    return len(batches), seqlen


class _Run:
    """One validated run: method, pattern, profile and selection, applied to whatever source feeds blocks."""

    def __init__(self, config: OneShotConfig, model: nn.Module, structure: DecoderStructure,
                 device: torch.device) -> None:
        self.config, self.model, self.structure, self.device = config, model, structure, device
        self.method = METHODS.get(config.method)
        self.pattern = config.parsed_pattern
        self.options = config.method_options()
        self.profile = config.make_profile()
        self.selection: Selection = select_linears(model, structure, config.op_names, config.excluded_op_names,
                                                   self.pattern)
        self.sparsities: list[float] = []
        self._groups: dict = {}  # input groups per block class and selection (prune_block's group_cache)

    def _linears(self, ctx: LayerContext) -> dict[str, nn.Module]:
        return self.selection.modules(ctx.index, ctx.block)

    def run(self, batches: list[Any], source_factory: Callable[[bool], LayerSource], progress: bool,
            after_linear: Callable[[], None] | None = None) -> None:
        """The profile's dense pass when it needs one, then the pruning pass."""
        batches = micro_batches(batches)
        def dense_pass(observe: Callable) -> None:
            run_sequential(self.model, batches, lambda ctx: observe(ctx, self._linears(ctx)),
                           structure=self.structure, source=source_factory(False), device=self.device,
                           progress=progress, desc=f"{self.profile.name} profile")

        self.sparsities = self.profile.layer_sparsities(dense_pass, self.config.target_sparsity,
                                                        len(self.structure))

        def on_layer(ctx: LayerContext) -> None:
            linears = self._linears(ctx)
            if linears:
                prune_block(ctx, linears, self.selection.per_block[ctx.index], self.sparsities[ctx.index],
                            self.pattern, self.method, self.options, after_linear, group_cache=self._groups)

        run_sequential(self.model, batches, on_layer, structure=self.structure, source=source_factory(True),
                       device=self.device, progress=progress, desc=f"{self.method.name} {self.pattern.spec}")

    def layer_targets(self) -> dict[str, float]:
        return {self.structure.layer_name(i): s for i, s in enumerate(self.sparsities)}


def oneshot(model_or_path: nn.Module | str | os.PathLike, calibration: Calibration,
            config: OneShotConfig | dict | str | Path | None = None, *, output_dir: str | os.PathLike | None = None,
            tokenizer: Any = None, progress: bool = True, dataset_split: str = "train",
            text_column: str = "text") -> OneShotReport:
    """Prune a decoder LLM in one shot from calibration data; returns a :class:`OneShotReport`.

    ``model_or_path``: a loaded causal LM (pruned in place; masks stay as prunekit masks, so training can go on
    with ``prepare_pruning(..., lock_init_sparsity=True)``), or a local safetensors checkout / hub id (streamed
    block by block; ``output_dir`` then receives the pruned checkout). ``calibration``: token ids
    ``[nsamples, seqlen]``, a list of texts, a ``.txt`` / ``.jsonl`` / SQuAD ``.json`` file, a dataset name, or
    a list of model batches. ``config``: a :class:`OneShotConfig`, a dict of its keys or a YAML file.
    With ``output_dir``, the pruned model, ``report.json`` and ``report.png`` are written there (it must not
    exist; it appears only when everything succeeded).
    """
    began = time.perf_counter()
    cfg = load_oneshot_config(config)
    out = check_output_dir(output_dir)
    device = resolve_device(cfg.device)
    if isinstance(model_or_path, nn.Module):
        model, ckpt = model_or_path, None
        structure = find_decoder(model)
        name = type(model).__name__
        factory = None
    elif isinstance(model_or_path, (str, os.PathLike)):
        ckpt = Checkpoint(model_or_path, cfg.dtype)
        model, structure, name, factory = ckpt.model, ckpt.structure, str(model_or_path), ckpt.tokenizer
    else:
        raise ConfigError("model", type(model_or_path).__name__, "allowed: an nn.Module causal LM, a model "
                          "directory or a hub id")
    whole_model = METHODS.get(cfg.method).whole_model
    if whole_model and ckpt is not None:
        raise ConfigError("method", cfg.method, "allowed for a model path: methods that prune block by block "
                          "(sparsegpt, wanda, magnitude); load the model and pass the nn.Module for whole-model "
                          "methods such as retrain_free (they need the whole model's gradients)")
    run = None if whole_model else _Run(cfg, model, structure, device)
    batches = calibration_batches(calibration, cfg, tokenizer, factory, split=dataset_split,
                                  text_column=text_column)
    if not batches:
        raise ConfigError("calibration", "no batches", "allowed: at least one calibration sample")
    nsamples, seqlen = _batch_shape(batches)
    if run is None:
        return _whole_model(cfg, model, batches, nsamples, seqlen, name, device, out, tokenizer, began, progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    # ---- validation done: the work starts here -------------------------------------------------------------
    if ckpt is None:
        if cfg.dtype:
            model.to(getattr(torch, cfg.dtype))
        run.run(batches, lambda _writes: InMemoryLayers(model, structure, device), progress)
        sparsity = sparsity_report(model)
        report = _report(cfg, run, sparsity, nsamples, seqlen, name, device, out, began, streamed=False)
        return _save_in_memory(model, tokenizer, report, out, began, device)
    return _streamed(cfg, run, ckpt, batches, nsamples, seqlen, name, device, out, began, progress)


def _whole_model(cfg: OneShotConfig, model: nn.Module, batches: list[Any], nsamples: int, seqlen: int, name: str,
                 device: torch.device, out: Path | None, tokenizer: Any, began: float,
                 progress: bool) -> OneShotReport:
    """Methods that score from whole-model gradients (retrain_free): their own entry point, same report."""
    from prunekit.oneshot.retrain_free import retrain_free_prune

    # language-model loss on the calibration tokens: the labels are the inputs (shifted inside the model)
    lm_batches = [b if isinstance(b, dict) else {"input_ids": b, "labels": b} for b in batches]
    pruning = {"pruning_type": cfg.method, "pattern": cfg.pattern, "target_sparsity": cfg.target_sparsity,
               "op_names": list(cfg.op_names), "excluded_op_names": list(cfg.excluded_op_names)}
    retrain_free_prune(model, lm_batches, pruning, device=device, progress=progress)
    report = OneShotReport(method=cfg.method, pattern=cfg.pattern, target_sparsity=cfg.target_sparsity,
                           profile=cfg.profile, sparsity=sparsity_report(model), nsamples=nsamples, seqlen=seqlen,
                           model=name, device=str(device), output_dir=str(out) if out else None,
                           config=cfg.to_dict())
    return _save_in_memory(model, tokenizer, report, out, began, device)


def _save_in_memory(model: nn.Module, tokenizer: Any, report: OneShotReport, out: Path | None, began: float,
                    device: torch.device) -> OneShotReport:
    """Finish the report and, given ``out``, write model, tokenizer and report there (staged, then renamed)."""
    if out is None:
        _finish_report(report, began, device)
        return report
    with staged_dir(out) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
        _finish_report(report, began, device)
        report.save(staging)
    return report


def _streamed(cfg: OneShotConfig, run: _Run, ckpt: Checkpoint, batches: list[Any], nsamples: int, seqlen: int,
              name: str, device: torch.device, out: Path | None, began: float, progress: bool) -> OneShotReport:
    parts: dict[int, SparsityReport] = {}
    rest: list[SparsityReport] = []

    def measure(index: int, block: nn.Module) -> None:
        parts[index] = sparsity_report(block, prefix=ckpt.structure.layer_name(index))
        drop_masks(block)  # the masks go with the block: the written weights hold the zeros

    writer_cm = ShardWriter(out, 1 + len(ckpt.structure)) if out is not None else None

    def source(writes: bool) -> SafetensorsLayers:
        if not writes:  # the profile's dense pass reads blocks and writes nothing
            return SafetensorsLayers(ckpt, device)
        return SafetensorsLayers(ckpt, device, writer_cm, measure, lambda model: rest.append(sparsity_report(model)))

    if writer_cm is None:
        run.run(batches, source, progress, return_free_memory)
        report = _report(cfg, run, SparsityReport.merge(rest + [parts[i] for i in sorted(parts)]), nsamples,
                         seqlen, name, device, None, began, streamed=True)
        _finish_report(report, began, device)
        return report
    with writer_cm as writer:
        run.run(batches, source, progress, return_free_memory)
        report = _report(cfg, run, SparsityReport.merge(rest + [parts[i] for i in sorted(parts)]), nsamples,
                         seqlen, name, device, out, began, streamed=True)

        def save_report(staging: Path) -> None:
            _finish_report(report, began, device)
            report.save(staging)

        writer.commit(ckpt.aux_files(), ckpt.dtype if cfg.dtype else None, save_report)
    return report


def _report(cfg: OneShotConfig, run: _Run, sparsity: SparsityReport, nsamples: int, seqlen: int, name: str,
            device: torch.device, out: Path | None, began: float, streamed: bool) -> OneShotReport:
    return OneShotReport(method=cfg.method, pattern=cfg.pattern, target_sparsity=cfg.target_sparsity,
                         profile=cfg.profile, sparsity=sparsity, layer_targets=run.layer_targets(),
                         nsamples=nsamples, seqlen=seqlen, model=name, streamed=streamed, device=str(device),
                         output_dir=str(out) if out is not None else None, config=cfg.to_dict())


def _finish_report(report: OneShotReport, began: float, device: torch.device) -> None:
    report.wall_time_s = time.perf_counter() - began
    report.peak_rss_bytes = peak_rss_bytes()
    report.peak_gpu_bytes = gpu_peak(device)
