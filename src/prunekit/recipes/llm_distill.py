"""``prunekit distill``: recover a structurally pruned decoder LLM by distillation from its dense teacher.

The student (a slimmed model: fewer FFN channels, heads or layers) learns the teacher's next-token distribution
(``KL`` at a temperature, optionally plus hidden-state MSE on matched layers; see
:func:`prunekit.recipes.distill.causal_lm_distill_loss`) on windows of ``--seqlen`` tokens from ``--train-text``
until ``--max-tokens`` tokens are used. Held-out perplexity is measured before, every ``--eval-every`` steps and
at the end.

Exact resume: the window order is a pure function of the text and ``--seed``; a checkpoint (``<output>/checkpoint``)
holds the student's weights, the optimizer, the learning-rate schedule, every RNG state and the step, so a run
killed at any point and restarted with ``--resume`` ends with the same weights, bit for bit, as one that never
stopped (same device, thread count and library versions).

Everything is checked (flags, folders, the teacher's vocabulary against the student's, the text against one
window) before a model is loaded or a file written. The output folder is a normal Hugging Face directory: config,
tokenizer and safetensors weights (a student with per-layer widths is written by
:func:`prunekit.slimming.save_slimmed` and reloads with :func:`prunekit.slimming.load_slimmed`), plus
``metrics.json``, ``history.json``, ``distill.png``, ``run_args.json`` and ``train.log``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from prunekit.config.schema import FrozenConfig
from prunekit.errors import ConfigError
from prunekit.recipes import outputs as out_mod
from prunekit.recipes.common import RecipeError, set_seed
from prunekit.recipes.distill import causal_lm_distill_loss, uniform_layer_map
from prunekit.recipes.train import LR_SCHEDULERS, build_optimizer, build_scheduler

logger = logging.getLogger("prunekit.recipes")

CHECKPOINT_DIR = "checkpoint"
_STATE_FILE = "trainer_state.pt"
_WEIGHTS_FILE = "student.safetensors"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "distill.png"
#: Fields that define the training trajectory: a resumed run must use the checkpoint's values.
TRAJECTORY_FIELDS = ("student", "teacher", "train_text", "dataset_split", "text_column", "max_tokens", "seqlen",
                     "windows", "batch_size", "grad_accum", "lr", "weight_decay", "lr_scheduler", "warmup_steps",
                     "temperature", "hidden_weight", "layer_map", "max_grad_norm", "seed", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class DistillConfig(FrozenConfig):
    """Everything one ``prunekit distill`` run needs; unknown keys and impossible values raise ConfigError."""

    student: str
    teacher: str
    train_text: str
    output: str
    max_tokens: int
    seqlen: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None  # None: 5 % of the steps
    temperature: float = 1.0
    hidden_weight: float = 0.0
    layer_map: tuple[int, ...] | None = None
    windows: Literal["consecutive", "random"] = "consecutive"
    dataset_split: str = "train"
    text_column: str = "text"
    eval_text: str | None = None
    eval_split: str = "validation"
    eval_every: int = 0
    eval_windows: int = 16
    eval_seqlen: int | None = None  # None: seqlen
    checkpoint_every: int | None = None  # None: about 10 checkpoints per run; 0: none
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_grad_norm: float | None = 1.0
    progress: bool = True
    stop_after_steps: int | None = None  # test hook: checkpoint and stop as if killed after this step

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ConfigError(_flag("lr_scheduler"), value, "allowed: " + ", ".join(LR_SCHEDULERS))
        return value

    @model_validator(mode="after")
    def _check_values(self) -> "DistillConfig":
        positive = ("max_tokens", "batch_size", "grad_accum", "eval_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(_flag(name), getattr(self, name), "allowed: an integer >= 1")
        for name in ("seqlen", "eval_seqlen"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ConfigError(_flag(name), value, "allowed: an integer >= 2 (one prediction needs two tokens)")
        if self.max_tokens < self.seqlen:
            raise ConfigError(_flag("max_tokens"), self.max_tokens,
                              f"allowed: at least one window of --seqlen = {self.seqlen} tokens")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(_flag(name), value, "allowed: an integer >= 0")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(_flag("stop_after_steps"), self.stop_after_steps, "allowed: an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(_flag("lr"), self.lr, "allowed: a finite float > 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(_flag("temperature"), self.temperature, "allowed: a finite float > 0")
        for name in ("hidden_weight", "weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(_flag(name), value, "allowed: a finite float >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(_flag("max_grad_norm"), self.max_grad_norm, "allowed: a float > 0, or none")
        if self.layer_map is not None and self.hidden_weight == 0:
            raise ConfigError(_flag("layer_map"), ",".join(map(str, self.layer_map)),
                              "allowed: only with --hidden-weight > 0 (it says which layers the MSE compares)")
        return self

    @property
    def total_windows(self) -> int:
        """Training windows the token budget buys (a partial window is not used)."""
        return self.max_tokens // self.seqlen

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        """Optimizer steps; the last one may see fewer windows than ``batch_size × grad_accum``."""
        return math.ceil(self.total_windows / self.windows_per_step)


# ---------------------------------------------------------------------------------------------------------------
# checks before any work


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", spec, "allowed: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", spec, "allowed: cpu or auto (no CUDA device is visible)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("--device", spec, f"allowed: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError("--device", spec, "allowed: auto, cpu, cuda or cuda:N")
    return device


def _load_config(path: str, flag: str):
    from transformers import AutoConfig

    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(flag, path, "allowed: a model folder holding config.json (save_pretrained or "
                          "prunekit.save_slimmed), or a hub id", "no such folder" if not local.exists()
                          else "no config.json in it")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{flag}: cannot read the model config of {path!r}: {first}") from None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise RecipeError(f"cannot tell the number of decoder layers from the {config.model_type} config")


def _check_vocabulary(student_cfg, teacher_cfg, student_tok, teacher_tok, cfg: DistillConfig) -> None:
    """The KL compares distributions token by token: both models must speak the same vocabulary."""
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError("--teacher", cfg.teacher, f"allowed: a teacher with the student's vocabulary "
                          f"({student_cfg.vocab_size} tokens)", f"the teacher has {teacher_cfg.vocab_size}")
    if teacher_tok is None:
        raise ConfigError("--teacher", cfg.teacher, "allowed: a model folder with its tokenizer")
    if student_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise ConfigError("--teacher", cfg.teacher, "allowed: a teacher whose tokenizer maps every token to the same "
                          "id as the student's", f"{len(differ)} (token, id) pairs differ, e.g. {differ[0]!r}")


def _texts(source: str, split: str, column: str, key: str, held_out: bool = False) -> list[str]:
    from prunekit.oneshot.data import load_texts

    return load_texts(source, split=split, text_column=column, key=key, held_out=held_out)


def _train_windows(cfg: DistillConfig, tokenizer) -> tuple[torch.Tensor, int]:
    """``[total_windows, seqlen]`` training windows in training order, and how many distinct windows the text
    holds. ``consecutive``: the text cut into non-overlapping windows, shuffled with the seed, repeated in a
    fresh order when the budget needs more; ``random``: seeded random offsets."""
    from prunekit.oneshot.data import calibration_windows, evaluation_windows

    texts = _texts(cfg.train_text, cfg.dataset_split, cfg.text_column, "--train-text")
    n = cfg.total_windows
    if cfg.windows == "random":
        return calibration_windows(texts, tokenizer, n, cfg.seqlen, seed=cfg.seed, key="--train-text"), n
    distinct = evaluation_windows(texts, tokenizer, cfg.seqlen, key="--train-text")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    order = torch.cat([torch.randperm(distinct.shape[0], generator=gen)
                       for _ in range(math.ceil(n / distinct.shape[0]))])[:n]
    return distinct[order], distinct.shape[0]


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_output(cfg: DistillConfig) -> tuple[Path, Path | None]:
    """The output folder and the checkpoint to resume from (None: a fresh run). Writes nothing."""
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError("--output", cfg.output, "allowed: a folder (this is a file)")
    if not out.is_dir() or not any(out.iterdir()):
        return out, None
    checkpoint = _latest_checkpoint(out)
    if not cfg.resume:
        what = "holds a checkpoint of an unfinished run" if checkpoint else "is not empty"
        raise ConfigError("--output", cfg.output, "allowed: a new or empty folder, or --resume to continue the "
                          "run saved there", what)
    if checkpoint is None:
        finished = (out / METRICS_FILE).exists()
        raise ConfigError("--output", cfg.output, "allowed with --resume: a folder holding a checkpoint",
                          "its run has finished" if finished else "it holds no checkpoint")
    return out, checkpoint


def _latest_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old: a crash between the two renames of a save
        if (out / name / _STATE_FILE).is_file() and (out / name / _WEIGHTS_FILE).is_file():
            return out / name
    return None


def _check_layer_map(cfg: DistillConfig, student_layers: int, teacher_layers: int, student_cfg) -> tuple | None:
    if cfg.hidden_weight == 0:
        return None
    if cfg.layer_map is None:
        record = getattr(student_cfg, "prunekit_slimming", None) or {}
        kept = record.get("kept_layers")  # a student made by dropping layers may say which teacher layers it kept
        mapping = tuple(kept) if kept else uniform_layer_map(student_layers, teacher_layers)
    else:
        mapping = tuple(cfg.layer_map)
    if len(mapping) != student_layers or not all(0 <= j < teacher_layers for j in mapping):
        raise ConfigError("--layer-map", ",".join(map(str, mapping)),
                          f"allowed: {student_layers} teacher layer indices (one per student layer), each in "
                          f"0..{teacher_layers - 1}")
    return mapping


class _Plan:
    """What the checks found: resolved paths, tokenizer, windows, layer map, the checkpoint to resume."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def check(cfg: DistillConfig) -> _Plan:
    """Every check that can fail, in order, before a model is loaded or anything is written."""
    device = _resolve_device(cfg.device)
    out, checkpoint = _check_output(cfg)
    student_cfg = _load_config(cfg.student, "--student")
    teacher_cfg = _load_config(cfg.teacher, "--teacher")
    student_tok, teacher_tok = _load_tokenizer(cfg.student), _load_tokenizer(cfg.teacher)
    _check_vocabulary(student_cfg, teacher_cfg, student_tok, teacher_tok, cfg)
    tokenizer = student_tok or teacher_tok
    if cfg.hidden_weight > 0 and student_cfg.hidden_size != teacher_cfg.hidden_size:
        raise ConfigError("--hidden-weight", cfg.hidden_weight, "allowed: 0 when the student's hidden size "
                          f"({student_cfg.hidden_size}) differs from the teacher's ({teacher_cfg.hidden_size})")
    s_layers, t_layers = _num_layers(student_cfg), _num_layers(teacher_cfg)
    layer_map = _check_layer_map(cfg, s_layers, t_layers, student_cfg)
    if cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--dtype", cfg.dtype, "allowed: float32 (this GPU has no bfloat16)")
    windows, distinct = _train_windows(cfg, tokenizer)
    eval_windows = None
    if cfg.eval_text is not None:
        from prunekit.oneshot.data import evaluation_windows

        texts = _texts(cfg.eval_text, cfg.eval_split, cfg.text_column, "--eval-text", held_out=True)
        eval_windows = evaluation_windows(texts, tokenizer, cfg.eval_seqlen or cfg.seqlen, cfg.eval_windows,
                                          key="--eval-text")
    state = None
    if checkpoint is not None:
        state = torch.load(checkpoint / _STATE_FILE, map_location="cpu", weights_only=True)
        saved = state["config"]
        for name in TRAJECTORY_FIELDS:
            now = getattr(cfg, name)
            now = list(now) if isinstance(now, tuple) else now
            if saved.get(name) != now:
                raise ConfigError(_flag(name), now, f"allowed with --resume: {saved.get(name)!r}, the value the "
                                  f"checkpoint in {checkpoint} was made with")
        if state["windows_digest"] != _digest(windows):
            raise ConfigError("--train-text", cfg.train_text, "allowed with --resume: the same text as the "
                              "checkpoint's run (its windows differ)")
    return _Plan(device=device, out=out, checkpoint=checkpoint, state=state, tokenizer=tokenizer,
                 student_cfg=student_cfg, teacher_layers=t_layers, student_layers=s_layers, layer_map=layer_map,
                 windows=windows, distinct_windows=distinct, eval_windows=eval_windows)


# ---------------------------------------------------------------------------------------------------------------
# models


def _is_slimmed(config) -> bool:
    from prunekit.slimming.hf_config import ENTRY

    return bool(getattr(config, ENTRY, None))


def load_student(path: str, config=None) -> torch.nn.Module:
    """The student in float32: through :func:`prunekit.load_slimmed` when its config records slimmed shapes
    (per-layer widths need it), else plain ``from_pretrained``."""
    if config is not None and _is_slimmed(config) and Path(path).is_dir():
        from prunekit.slimming import load_slimmed

        return load_slimmed(path).float()
    return _from_pretrained(path, torch.float32, "--student")


def _from_pretrained(path: str, dtype: torch.dtype, flag: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{flag}: cannot load a causal LM from {path!r}: {first}") from None


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _save_final(student, tokenizer, out: Path, slimmed: bool) -> None:
    """Write the model into ``out`` (config, safetensors, tokenizer), whole or not at all: written to a temporary
    folder first, then moved in."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student = student.float().eval()
    if slimmed:  # per-layer shapes recorded in the config: the format load_slimmed rebuilds
        from prunekit.slimming import save_slimmed

        save_slimmed(student, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        out_mod.save_model(student, tokenizer, tmp)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state(device: torch.device) -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _save_checkpoint(out: Path, student, optimizer, scheduler, progress: dict, cfg: DistillConfig,
                     windows_digest: str, device: torch.device) -> Path:
    """Write the checkpoint next to the previous one, then swap it in, so a kill during the write loses nothing."""
    from safetensors.torch import save_model

    tmp, final, old = out / (CHECKPOINT_DIR + ".tmp"), out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / _WEIGHTS_FILE), metadata={"format": "pt"})
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.model_dump().items()}
    torch.save({"config": config, "windows_digest": windows_digest, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(device), **progress}, tmp / _STATE_FILE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(checkpoint: Path, student, optimizer, scheduler, state: dict, device: torch.device) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(student, str(checkpoint / _WEIGHTS_FILE), strict=False, device=str(device))
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RecipeError(f"--resume: the checkpoint in {checkpoint} does not fit the student (missing "
                          f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], device)


# ---------------------------------------------------------------------------------------------------------------
# the run


def _perplexity(model, windows, device, cfg: DistillConfig) -> float:
    from prunekit.oneshot.evaluate import perplexity

    with _autocast(device, cfg.dtype):
        return perplexity(model, windows, batch_size=cfg.batch_size, device=device)


def _param_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_distill(cfg: DistillConfig) -> dict:
    """Run (or resume) one distillation; returns the metrics also written to ``metrics.json``.

    With ``stop_after_steps`` the run checkpoints after that step and returns ``{"stopped_at_step": n}``, as a
    run killed there would leave it.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    log = out_mod.RunLog()
    try:
        return _run(cfg, log)
    finally:
        log.close()


def _run(cfg: DistillConfig, log: out_mod.RunLog) -> dict:
    t_start = time.perf_counter()
    plan = check(cfg)
    device, out, state = plan.device, plan.out, plan.state
    total_steps = cfg.total_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total_steps)
    set_seed(cfg.seed)

    student = load_student(cfg.student, plan.student_cfg).to(device)
    teacher = _from_pretrained(cfg.teacher, DTYPES[cfg.dtype], "--teacher").to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    optimizer = build_optimizer(student, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, warmup, total_steps)
    progress = {"step": 0, "tokens": 0, "train_time_s": 0.0, "history": [], "evals": [], "teacher_ppl": None,
                "resumed_at_steps": []}
    if state is not None:
        _load_checkpoint(plan.checkpoint, student, optimizer, scheduler, state, device)
        progress.update({k: state[k] for k in progress})
        progress["resumed_at_steps"] = [*progress["resumed_at_steps"], progress["step"]]

    # From here on the output folder is written.
    out.mkdir(parents=True, exist_ok=True)
    log.attach(out, append=state is not None)
    digest = _digest(plan.windows)
    if state is None:
        out_mod.write_json(out / "run_args.json", {"config": cfg.model_dump(), "total_steps": total_steps,
                                                   "warmup_steps": warmup, "device": str(device),
                                                   "versions": _versions()})
    logger.info("distill %s -> student %s (%d -> %d layers, %.1fM -> %.1fM parameters) on %s, %s", cfg.teacher,
                cfg.student, plan.teacher_layers, plan.student_layers, _param_count(teacher) / 1e6,
                _param_count(student) / 1e6, device, cfg.dtype)
    logger.info("%d windows of %d tokens (%d distinct in the text), %d steps of %d windows, %s",
                cfg.total_windows, cfg.seqlen, plan.distinct_windows, total_steps, cfg.windows_per_step,
                f"resuming at step {progress['step']}" if state is not None else "fresh start")

    def evaluate(step: int) -> None:
        if plan.eval_windows is None:
            return
        ppl = _perplexity(student, plan.eval_windows, device, cfg)
        progress["evals"].append({"step": step, "tokens": progress["tokens"], "perplexity": ppl})
        logger.info("step %d/%d: held-out perplexity %.3f (teacher %.3f)", step, total_steps, ppl,
                    progress["teacher_ppl"])

    if plan.eval_windows is not None and progress["teacher_ppl"] is None:
        progress["teacher_ppl"] = _perplexity(teacher, plan.eval_windows, device, cfg)
    if state is None:
        evaluate(0)

    ckpt_every = cfg.checkpoint_every if cfg.checkpoint_every is not None else max(1, math.ceil(total_steps / 10))
    result = _train(cfg, plan, student, teacher, optimizer, scheduler, progress, evaluate, ckpt_every, digest)
    if result is not None:  # stopped by the test hook or interrupted: the checkpoint holds the state
        return result

    if plan.eval_windows is not None and (not progress["evals"] or progress["evals"][-1]["step"] != total_steps):
        evaluate(total_steps)
    metrics = _metrics(cfg, plan, progress, student, teacher, device, time.perf_counter() - t_start)
    _save_final(student, plan.tokenizer, out, _is_slimmed(student.config))
    out_mod.write_json(out / HISTORY_FILE, {"train": progress["history"], "eval": progress["evals"]})
    plot_history(out / PLOT_FILE, progress["history"], progress["evals"], progress["teacher_ppl"])
    out_mod.write_json(out / METRICS_FILE, metrics)
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)  # the run is finished: the final model supersedes it
    logger.info("results\n%s", results_table(metrics))
    logger.info("wrote %s", out)
    return metrics


def _train(cfg, plan, student, teacher, optimizer, scheduler, progress, evaluate, ckpt_every, digest):
    """The optimizer steps from ``progress['step']`` on. Returns None when done, else the stop/interrupt record."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    device, windows, total_steps = plan.device, plan.windows, cfg.total_steps
    need_hidden = cfg.hidden_weight > 0
    tokens_total = cfg.total_windows * cfg.seqlen
    ema = progress["history"][-1]["loss_ema"] if progress["history"] else None
    report_every = max(1, total_steps // 20)

    def checkpoint() -> Path:
        return _save_checkpoint(plan.out, student, optimizer, scheduler, progress, cfg, digest, device)

    bar = tqdm(total=tokens_total, initial=progress["tokens"], desc="distill", unit="tok", unit_scale=True,
               dynamic_ncols=True, mininterval=1.0, disable=not cfg.progress)
    consistent = True  # False only while the weights and the optimizer are being updated
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("prunekit")]):
            while progress["step"] < total_steps:
                step = progress["step"]
                t0 = time.perf_counter()
                chunk = windows[step * cfg.windows_per_step:(step + 1) * cfg.windows_per_step]
                loss_sum, parts_sum = 0.0, {}
                for micro in chunk.split(cfg.batch_size):
                    ids = micro.to(device)
                    with _autocast(device, cfg.dtype):
                        with torch.no_grad():
                            t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
                        s_out = student(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
                        loss, parts = causal_lm_distill_loss(s_out, t_out, cfg.temperature, cfg.hidden_weight,
                                                             plan.layer_map)
                    share = micro.shape[0] / chunk.shape[0]  # a token-weighted mean over the step's windows
                    (loss * share).backward()
                    loss_sum += float(loss.detach()) * share
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v * share
                    del s_out, t_out, loss
                consistent = False
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] = step + 1
                progress["tokens"] += chunk.numel()
                consistent = True
                dt = time.perf_counter() - t0
                progress["train_time_s"] += dt
                ema = loss_sum if ema is None else 0.9 * ema + 0.1 * loss_sum
                lr = optimizer.param_groups[0]["lr"]
                progress["history"].append({"step": step + 1, "tokens": progress["tokens"], "loss": loss_sum,
                                            "loss_ema": ema, "lr": lr, **parts_sum})
                bar.update(chunk.numel())
                last_ppl = progress["evals"][-1]["perplexity"] if progress["evals"] else None
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}",
                                **({"ppl": f"{last_ppl:.2f}"} if last_ppl is not None else {}), refresh=False)
                done = progress["step"]
                if done % report_every == 0 or done == total_steps:  # train.log shows progress without a bar
                    logger.info("step %d/%d: loss %.4f (running %.4f), lr %.3g, %.1f tokens/s", done, total_steps,
                                loss_sum, ema, lr, chunk.numel() / max(dt, 1e-9))
                if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                    evaluate(done)
                if cfg.stop_after_steps is not None and done >= cfg.stop_after_steps and done < total_steps:
                    path = checkpoint()
                    logger.info("stopped after step %d as asked; checkpoint %s (continue with --resume)", done, path)
                    return {"stopped_at_step": done, "checkpoint": str(path)}
                if ckpt_every and done % ckpt_every == 0 and done < total_steps:
                    logger.info("step %d/%d: checkpoint %s", done, total_steps, checkpoint())
    except KeyboardInterrupt:
        if consistent and progress["step"] > 0:
            path = checkpoint()
            logger.warning("interrupted after step %d; checkpoint %s (continue with --resume)",
                           progress["step"], path)
        raise
    finally:
        bar.close()
    return None


def _metrics(cfg, plan, progress, student, teacher, device, wall_s) -> dict:
    evals = progress["evals"]
    before = evals[0]["perplexity"] if evals and evals[0]["step"] == 0 else None
    after = evals[-1]["perplexity"] if evals else None
    teacher_ppl = progress["teacher_ppl"]
    gap = log_gap = None
    if None not in (before, after, teacher_ppl) and before != teacher_ppl:
        gap = (before - after) / (before - teacher_ppl)
        # the same in log-perplexity (mean NLL): not dominated by a huge one-shot perplexity
        log_gap = (math.log(before) - math.log(after)) / (math.log(before) - math.log(teacher_ppl))
    train_s = progress["train_time_s"]
    return {
        "student": cfg.student, "teacher": cfg.teacher,
        "parameters": {"student": _param_count(student), "teacher": _param_count(teacher)},
        "layers": {"student": plan.student_layers, "teacher": plan.teacher_layers,
                   "layer_map": list(plan.layer_map) if plan.layer_map else None},
        "perplexity": {"teacher": teacher_ppl, "student_before": before, "student_after": after,
                       "gap_closed": gap, "log_gap_closed": log_gap, "eval_windows": None if plan.eval_windows is None
                       else list(plan.eval_windows.shape)},
        "loss": {"first": progress["history"][0]["loss"] if progress["history"] else None,
                 "last": progress["history"][-1]["loss"] if progress["history"] else None},
        "steps": progress["step"], "tokens": progress["tokens"],
        "resumed_at_steps": progress["resumed_at_steps"],
        "time": {"train_s": train_s, "tokens_per_s": progress["tokens"] / train_s if train_s else None,
                 "this_process_wall_s": wall_s},
        "device": str(device), "dtype": cfg.dtype, "config": cfg.model_dump(),
    }


def results_table(metrics: dict) -> str:
    """The run's numbers as a small text table."""
    ppl = metrics["perplexity"]
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    rows = [("teacher (dense)", metrics["parameters"]["teacher"], ppl["teacher"]),
            ("student before", metrics["parameters"]["student"], ppl["student_before"]),
            ("student after", metrics["parameters"]["student"], ppl["student_after"])]
    lines = [f"{'model':<16} {'parameters':>12} {'perplexity':>11}"]
    lines += [f"{name:<16} {params:>12,} {fmt(value):>11}" for name, params, value in rows]
    lines.append(f"gap closed: {fmt(ppl['gap_closed'], '.1%')} (in log-perplexity "
                 f"{fmt(ppl.get('log_gap_closed'), '.1%')}); {metrics['tokens']:,} tokens in "
                 f"{metrics['steps']} steps, {fmt(metrics['time']['tokens_per_s'], '.1f')} tokens/s")
    return "\n".join(lines)


def plot_history(path: Path, history: list[dict], evals: list[dict], teacher_ppl: float | None) -> bool:
    """Training loss (left) and held-out perplexity (right) over tokens as one PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", path.name)
        return False
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([h["tokens"] for h in history], [h["loss"] for h in history], color="#55a868", alpha=0.5)
    ax_loss.plot([h["tokens"] for h in history], [h["loss_ema"] for h in history], color="#55a868")
    ax_loss.set_xlabel("training tokens")
    ax_loss.set_ylabel("distillation loss")
    if evals:
        ax_ppl.plot([e["tokens"] for e in evals], [e["perplexity"] for e in evals], "o-", color="#4c72b0",
                    label="student")
    if teacher_ppl is not None:
        ax_ppl.axhline(teacher_ppl, color="#c44e52", linestyle=":", label="teacher")
    ax_ppl.set_xlabel("training tokens")
    ax_ppl.set_ylabel("held-out perplexity")
    if evals or teacher_ppl is not None:
        ax_ppl.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> dict:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# command line


def _layer_map_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated teacher layer indices, e.g. "
                                         "0,2,4") from None


def distill_parser(prog: str = "prunekit distill") -> argparse.ArgumentParser:
    """The flags of ``prunekit distill`` (one per :class:`DistillConfig` field)."""
    from prunekit.recipes.args import OneLineArgumentParser

    p = OneLineArgumentParser(prog=prog, description="Recover a structurally pruned decoder LLM by distillation "
                              "from its dense teacher (logit KL, optionally hidden-state MSE).")
    d = DistillConfig.model_fields
    g = p.add_argument_group("models and output")
    g.add_argument("--student", required=True, help="the pruned model folder (plain or prunekit.save_slimmed)")
    g.add_argument("--teacher", required=True, help="the dense model folder (same vocabulary)")
    g.add_argument("--output", required=True, help="new folder for the recovered model, metrics and checkpoints")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --output")
    t = p.add_argument_group("data")
    t.add_argument("--train-text", required=True,
                   help=".txt, .jsonl (--text-column), SQuAD .json, or a datasets name (wikitext:wikitext-2-raw-v1)")
    t.add_argument("--max-tokens", type=int, required=True, help="training token budget")
    t.add_argument("--seqlen", type=int, default=d["seqlen"].default, help="tokens per training window")
    t.add_argument("--windows", choices=("consecutive", "random"), default=d["windows"].default,
                   help="consecutive: the text cut into windows, shuffled; random: seeded random offsets")
    t.add_argument("--dataset-split", default=d["dataset_split"].default, help="split of a datasets name")
    t.add_argument("--text-column", default=d["text_column"].default, help="text field of .jsonl / datasets")
    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-text", default=None, help="held-out text for perplexity (same forms as --train-text)")
    e.add_argument("--eval-split", default=d["eval_split"].default, help="split of a datasets name")
    e.add_argument("--eval-every", type=int, default=0, help="optimizer steps between evaluations (0: before and "
                   "after only)")
    e.add_argument("--eval-windows", type=int, default=d["eval_windows"].default, help="held-out windows")
    e.add_argument("--eval-seqlen", type=int, default=None, help="tokens per held-out window (default --seqlen)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=d["lr"].default, help="AdamW peak learning rate")
    o.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="windows per micro-batch")
    o.add_argument("--grad-accum", type=int, default=d["grad_accum"].default, help="micro-batches per step")
    o.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    o.add_argument("--lr-scheduler", default=d["lr_scheduler"].default, choices=LR_SCHEDULERS)
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 5 %% of the steps")
    o.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"].default)
    o.add_argument("--temperature", type=float, default=d["temperature"].default, help="KL temperature")
    o.add_argument("--hidden-weight", type=float, default=d["hidden_weight"].default,
                   help="weight of the hidden-state MSE on matched layers (0: logits only)")
    o.add_argument("--layer-map", type=_layer_map_arg, default=None,
                   help="teacher layer per student layer for the MSE (default: round((i+1)*Lt/Ls)-1)")
    o.add_argument("--seed", type=int, default=d["seed"].default)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d["device"].default, help="auto, cpu, cuda, cuda:N")
    r.add_argument("--dtype", choices=tuple(DTYPES), default=d["dtype"].default,
                   help="compute dtype (bfloat16: autocast, float32 master weights)")
    r.add_argument("--checkpoint-every", type=int, default=None,
                   help="optimizer steps between checkpoints (default: about 10 per run; 0: none)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated kill
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A :class:`DistillConfig` from parsed :func:`distill_parser` flags."""
    return DistillConfig(**vars(args))
