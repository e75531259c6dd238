"""Recipe checkpoints: ``--checkpointing_steps N|epoch`` writes them, ``--resume_from_checkpoint DIR|latest``
continues from one, bit-identically to a run that was never interrupted.

A checkpoint is the folder ``<output_dir>/checkpoint-<step>``:

* ``model.safetensors``: the weights (the pruned zeros included; no pickle);
* ``optimizer.pt``, ``scheduler.pt``, ``pruning_state.pt``: their ``state_dict()``;
* ``rng_state_<rank>.pt``: the Python, NumPy, torch (and CUDA) generators of each process, and the data
  shuffler's state at the start of the current epoch;
* ``trainer_state.json``: step, epoch, batches of the epoch done, loss history, the dense metrics, and the run's
  identity (trajectory flags, step plan, pruning config) that a resume must match.

It is written into ``.checkpoint-<step>.tmp`` and renamed when complete, ``trainer_state.json`` last, so a crash
while saving never leaves a folder that looks resumable. Every ``.pt`` is read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.recipes.common import RecipeError
from prunekit.recipes.outputs import CHECKPOINT_STATE_FILE as STATE_FILE
from prunekit.recipes.outputs import checkpoint_dirs, is_checkpoint, jsonable, write_json

logger = logging.getLogger("prunekit.recipes")

MODEL_FILE = "model.safetensors"
FORMAT = 1

#: Flags that shape the training trajectory: a resumed run must use the same ones (the rest, e.g. logging or
#: evaluation batch size, may differ).
TRAJECTORY_FLAGS = (
    "model_name_or_path", "task_name", "max_length", "max_seq_length", "doc_stride", "pad_to_max_length",
    "use_slow_tokenizer", "tokenizer_name", "max_train_samples", "per_device_train_batch_size", "learning_rate",
    "weight_decay", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps", "lr_scheduler_type",
    "num_warmup_steps", "max_grad_norm", "seed", "no_fused_adamw", "do_prune", "distill_loss_weight",
    "teacher_model_name_or_path", "distill_temperature", "distill_loss", "auto_slim", "ffn2_sparsity",
    "mha_sparsity", "train_file", "dev_derived_split",
)


def parse_every(value: str | None) -> int | str | None:
    """``--checkpointing_steps``: None, a step count >= 1, or ``"epoch"``."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "epoch":
        return "epoch"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise RecipeError(f"--checkpointing_steps: got {value!r}; give a step count >= 1 or 'epoch'")


def resolve(value: str, out_dir: Path) -> Path:
    """The folder ``--resume_from_checkpoint`` names: a checkpoint folder, or ``latest`` in ``out_dir``."""
    if value.strip().lower() == "latest":
        found = checkpoint_dirs(out_dir)
        if not found:
            raise RecipeError(f"--resume_from_checkpoint latest: no complete checkpoint-<step> folder in "
                              f"{str(out_dir)!r} (checkpoints are written with --checkpointing_steps N|epoch)")
        return found[-1]
    path = Path(value).expanduser()
    if not path.is_dir():
        raise RecipeError(f"--resume_from_checkpoint: {value!r} is not a folder; give a checkpoint-<step> folder "
                          "or 'latest'")
    if not (path / STATE_FILE).is_file():
        raise RecipeError(f"--resume_from_checkpoint: {value!r} holds no {STATE_FILE}, so it is not a complete "
                          "prunekit checkpoint (a save that was interrupted leaves .checkpoint-<step>.tmp)")
    return path


def run_identity(args, world_size: int, task_name: str | None = None, plan: dict | None = None,
                 pruning_config: Any = None) -> dict:
    """What makes two runs the same training run, as JSON values. Without ``task_name`` only the part known
    before any data is read (flags, processes): :func:`check_identity` then compares just that part."""
    flags = {k: getattr(args, k) for k in TRAJECTORY_FLAGS if hasattr(args, k)}
    identity = {"world_size": world_size, "flags": flags}
    if task_name is not None:
        identity.update(task=task_name, plan=plan, pruning_config=pruning_config)
    return jsonable(identity)


@dataclass
class Checkpoint:
    """A checkpoint read and checked, not yet applied."""

    path: Path
    state: dict  # trainer_state.json
    optimizer: dict
    scheduler: dict | None
    pruning: dict | None
    rng: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read(path: Path, rank: int = 0) -> Checkpoint:
    """Read every file of a checkpoint (``weights_only=True``); anything missing or damaged is one line."""
    from prunekit.safe_load import load_torch_file

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"--resume_from_checkpoint: {str(path / STATE_FILE)!r} is not readable JSON "
                          f"({type(exc).__name__})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RecipeError(f"--resume_from_checkpoint: {str(path / STATE_FILE)!r} has format "
                          f"{state.get('format') if isinstance(state, dict) else None!r}; this prunekit reads {FORMAT}")
    for key, kind in (("step", int), ("epoch", int), ("batches_done", int), ("samples_seen", int),
                      ("history", list), ("run", dict)):
        if not isinstance(state.get(key), kind) or (kind is int and state[key] < 0):
            raise RecipeError(f"--resume_from_checkpoint: {str(path / STATE_FILE)!r}: {key} is "
                              f"{state.get(key)!r}; expected a {'count >= 0' if kind is int else kind.__name__}")
    needed = [MODEL_FILE, "optimizer.pt", f"rng_state_{rank}.pt"]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise RecipeError(f"--resume_from_checkpoint: {str(path)!r} lacks {', '.join(missing)}")

    def optional(name: str, what: str):
        return load_torch_file(path / name, what) if (path / name).is_file() else None

    rng = load_torch_file(path / f"rng_state_{rank}.pt", "RNG state")
    if not isinstance(rng, dict) or "rng" not in rng:
        raise RecipeError(f"--resume_from_checkpoint: {str(path / f'rng_state_{rank}.pt')!r} is not an RNG state")
    return Checkpoint(path, state, load_torch_file(path / "optimizer.pt", "optimizer state"),
                      optional("scheduler.pt", "scheduler state"), optional("pruning_state.pt", "pruning state"), rng)


def check_identity(ckpt: Checkpoint, identity: dict) -> None:
    """Refuse to resume a checkpoint of another run (other flags, data size, step plan or pruning config);
    only the keys ``identity`` holds are compared."""
    saved = {k: v for k, v in ckpt.state["run"].items() if k in identity}
    if saved == identity:
        return
    for key in sorted(set(saved) | set(identity)):
        a, b = saved.get(key), identity.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        name = f"--{key.split('.', 1)[1]}" if key.startswith("flags.") else key
        raise RecipeError(f"--resume_from_checkpoint: {str(ckpt.path)!r} was written by a different run "
                          f"({name}: {json.dumps(a)[:80]} there, {json.dumps(b)[:80]} now); resume with the same flags")


def restore(ckpt: Checkpoint, model, optimizer, scheduler, pruning) -> None:
    """Load the checkpoint into the freshly built model, optimizer, scheduler and pruning object."""
    from safetensors.torch import load_model

    if (ckpt.pruning is None) != (pruning is None):
        raise RecipeError(f"--resume_from_checkpoint: {str(ckpt.path)!r} was written "
                          f"{'without' if ckpt.pruning is None else 'with'} pruning; this run is the opposite")
    try:
        load_model(model, str(ckpt.path / MODEL_FILE), strict=True)
        optimizer.load_state_dict(ckpt.optimizer)
        if scheduler is not None and ckpt.scheduler is not None:
            scheduler.load_state_dict(ckpt.scheduler)
        if pruning is not None:
            pruning.load_state_dict(ckpt.pruning)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RecipeError(f"--resume_from_checkpoint: {str(ckpt.path)!r} does not fit this model ({first})") from exc


def position(ckpt: Checkpoint):
    """The :class:`~prunekit.recipes.train.LoopPosition` the training loop continues from."""
    from prunekit.recipes.train import LoopPosition

    s = ckpt.state
    return LoopPosition(step=s["step"], epoch=s["epoch"], batches_done=s["batches_done"],
                        samples_seen=s["samples_seen"], ema=s.get("ema"), history=s["history"],
                        sampler_state=ckpt.rng.get("sampler"), rng=ckpt.rng["rng"])


class Checkpointer:
    """``on_step`` for the training loop: writes a checkpoint every ``every`` steps or at every epoch's end."""

    def __init__(self, out_dir: Path, every: int | str, env, model, optimizer, scheduler, pruning,
                 identity: dict, extra: dict | None = None):
        self.out_dir, self.every, self.env = out_dir, every, env
        self.model, self.optimizer, self.scheduler, self.pruning = model, optimizer, scheduler, pruning
        self.identity, self.extra = identity, dict(extra or {})
        self.saved: list[Path] = []

    def due(self, pos) -> bool:
        return pos.epoch_end if self.every == "epoch" else pos.step % self.every == 0

    def __call__(self, pos) -> None:
        if self.due(pos):
            self.saved.append(save(self.out_dir, pos, self.env, self.model, self.optimizer, self.scheduler,
                                   self.pruning, self.identity, self.extra))


def save(out_dir: Path, pos, env, model, optimizer, scheduler, pruning, identity: dict,
         extra: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (temporary folder, then rename); returns its path."""
    import torch
    from safetensors.torch import save_model

    from prunekit.recipes.train import unwrap

    final = out_dir / f"checkpoint-{pos.step}"
    tmp = out_dir / f".checkpoint-{pos.step}.tmp"
    if env.is_main:
        if tmp.exists():  # left by a save of this step that was interrupted
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    env.barrier()
    torch.save({"rng": pos.rng, "sampler": pos.sampler_state}, tmp / f"rng_state_{env.rank}.pt")
    env.barrier()
    if env.is_main:
        save_model(unwrap(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if pruning is not None:
            torch.save(pruning.state_dict(), tmp / "pruning_state.pt")
        write_json(tmp / STATE_FILE, {"format": FORMAT, "step": pos.step, "epoch": pos.epoch,
                                      "batches_done": pos.batches_done,
                                      "epoch_end": pos.epoch_end, "samples_seen": pos.samples_seen, "ema": pos.ema,
                                      "history": pos.history, "run": identity, **(extra or {})})
        _swap_in(tmp, final)
        logger.info("checkpoint %s", final)
    env.barrier()
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an older checkpoint of the same step (a resumed run passing it again) is
    replaced only once the new one is complete."""
    if final.exists():
        if not is_checkpoint(final):
            raise RecipeError(f"cannot write checkpoint {str(final)!r}: a folder of that name that is not a prunekit "
                              f"checkpoint is in the way (the new one is kept in {str(tmp)!r})")
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
