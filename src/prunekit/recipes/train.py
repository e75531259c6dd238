"""The one training loop GLUE and SQuAD share, plus process-group, optimizer and evaluation helpers.

The loop is plain PyTorch: forward, loss, backward, ``optimizer.step()``, ``zero_grad()``. Pruning is not called
from here: ``prunekit.prepare_pruning`` hooks the optimizer's step, so a dense fine-tune and a pruning run go
through the very same code. It runs on one process or under ``torchrun`` / ``accelerate launch`` (both set
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), with DDP on NCCL (GPU) or gloo (CPU).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger("prunekit.recipes")


# ---------------------------------------------------------------------------------------------------------------
# processes


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialized_here = False


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def setup_distributed(use_cpu: bool = False) -> DistEnv:
    """Join the process group the launcher describes in the environment, if any.

    ``torchrun`` and ``accelerate launch --multi_gpu`` set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; an MPI
    launch (``accelerate launch --cpu --mpirun_hostfile ...``, ``mpirun``) sets the Open MPI / PMI variables,
    which are read as well. NCCL on GPUs, gloo on CPUs.
    """
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    use_cpu = use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}
    cuda = torch.cuda.is_available() and not use_cpu
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    env = DistEnv(rank, world, local_rank, device)
    if world > 1 and not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
        env.initialized_here = True
    return env


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: torch.nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> torch.nn.Module:
    if not env.distributed:
        return model
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


# ---------------------------------------------------------------------------------------------------------------
# optimizer / schedule


NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias", "norm.weight")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the usual two groups (no decay for biases and LayerNorm weights).

    ``fused=None`` uses the fused kernel where this torch build has one for the parameters' device (CPU
    included in recent releases), else the default implementation.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if fused is not False:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            if fused:
                raise
            logger.debug("fused AdamW unavailable (%s); using the default implementation", exc)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps)


# ---------------------------------------------------------------------------------------------------------------
# data


class ListDataset(Dataset):
    def __init__(self, items: Sequence[dict]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` (no padding, no duplicates): evaluation shards."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(Sampler[int]):
    """The wrapped sampler, unchanged, except that its next pass can start ``n`` batches in: a resumed run
    continues mid-epoch without loading and collating the batches it already trained on.

    Batches are consecutive chunks of the sampler's order, so dropping ``n * batch_size`` indices leaves exactly
    the batches that followed; the shuffling generator still draws the whole permutation, as without the skip.
    """

    def __init__(self, base: Sampler[int], batch_size: int):
        self.base, self.batch_size, self._skip = base, batch_size, 0

    @property
    def generator(self) -> torch.Generator | None:
        """The generator that shuffles (single process); None under DDP, where the epoch number decides."""
        return getattr(self.base, "generator", None)

    def skip_batches(self, n: int) -> None:
        """Start the next pass ``n`` batches in."""
        self._skip = int(n)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        skip, self._skip = self._skip * self.batch_size, 0
        return itertools.islice(iter(self.base), skip, None)

    def __len__(self) -> int:
        return len(self.base)


def train_dataloader(dataset: Dataset, batch_size: int, collate: Callable, env: DistEnv, seed: int) -> DataLoader:
    if env.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                      shuffle=True, seed=seed, drop_last=False)
    else:
        gen = torch.Generator()
        gen.manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(dataset, generator=gen)
    return DataLoader(dataset, batch_size=batch_size, sampler=ResumableSampler(sampler, batch_size),
                      collate_fn=collate)


def move(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    global_step: int = 0
    train_time_s: float = 0.0
    samples_seen: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "sparsity"}

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.train_time_s if self.train_time_s > 0 else 0.0


@dataclass
class LoopPosition:
    """Where the loop stands after an optimizer step: with the modules' own states, all an exact resume needs."""

    step: int
    epoch: int  # the epoch the next batch comes from
    batches_done: int  # batches of ``epoch`` already trained on (all of them when ``epoch_end``)
    samples_seen: int
    ema: float | None  # smoothed loss shown on the progress bar
    history: list[dict]
    sampler_state: torch.Tensor | None  # the shuffling generator's state at the start of ``epoch``
    rng: dict | None = None  # prunekit.recipes.common.rng_state() right after the step
    epoch_end: bool = False  # this step ended an epoch


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def train_loop(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
               compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor], *, total_steps: int, env: DistEnv,
               lr_scheduler=None, pruning=None, gradient_accumulation_steps: int = 1,
               max_grad_norm: float | None = None, log_every: int | None = None, progress: bool = True,
               desc: str = "train", resume: LoopPosition | None = None,
               on_step: Callable[[LoopPosition], None] | None = None) -> TrainResult:
    """Train ``model`` (maybe DDP-wrapped) for ``total_steps`` optimizer steps.

    ``compute_loss(model, batch)`` returns the loss of one micro-batch (already on the device). ``pruning``
    (optional, hooked into ``optimizer`` already) is only read: for the sparsity shown and recorded.
    ``resume`` continues from a position an earlier run reported (model, optimizer, scheduler and pruning
    already restored by the caller): the data order and every random generator continue exactly.
    ``on_step(position)`` is called after every optimizer step (the recipes write checkpoints from it).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect = logging_redirect_tqdm(loggers=[logging.getLogger("prunekit")]) if env.is_main and progress \
        else contextlib.nullcontext()
    with redirect:
        return _train_loop(model, loader, optimizer, compute_loss, total_steps=total_steps, env=env,
                           lr_scheduler=lr_scheduler, pruning=pruning,
                           gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
                           log_every=log_every, progress=progress, desc=desc, resume=resume, on_step=on_step)


def _train_loop(model, loader, optimizer, compute_loss, *, total_steps, env, lr_scheduler, pruning,
                gradient_accumulation_steps, max_grad_norm, log_every, progress, desc, resume,
                on_step) -> TrainResult:
    from tqdm.auto import tqdm

    from prunekit.recipes.common import rng_state, set_rng_state

    accum = max(1, int(gradient_accumulation_steps))
    log_every = log_every or max(1, total_steps // 200)
    report_every = max(1, total_steps // 20)  # a line in the log (and train.log) about every 5 %
    result = TrainResult()
    model.train()
    step, micro, epoch = 0, 0, 0
    ema = None
    if resume is not None:
        step, epoch, ema = resume.step, resume.epoch, resume.ema
        result.samples_seen, result.history = resume.samples_seen, list(resume.history)
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not (progress and env.is_main),
               dynamic_ncols=True, mininterval=1.0)
    sampler = getattr(loader, "sampler", None)
    generator = getattr(sampler, "generator", None)
    running, running_n = 0.0, 0
    sparsity = pruning.current_sparsity() if pruning is not None else 0.0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    while step < total_steps:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = 0
        if resume is not None:
            if generator is not None and resume.sampler_state is not None:
                generator.set_state(resume.sampler_state)
            skip = resume.batches_done
            sampler.skip_batches(skip)
        epoch_start_state = generator.get_state() if generator is not None else None
        batches = iter(loader)
        if resume is not None:
            # creating the iterator drew from the global generator, as it did before the checkpoint: now every
            # generator continues from where the checkpoint left it
            set_rng_state(resume.rng)
            resume = None
        n_batches = len(loader)
        for i, batch in enumerate(batches, start=skip):
            micro += 1
            last_of_epoch = i == n_batches - 1
            sync = micro % accum == 0 or last_of_epoch
            batch = move(batch, env.device)
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with ctx:
                loss = compute_loss(model, batch)
                (loss / accum).backward()
            result.samples_seen += _batch_size(batch) * env.world_size
            running += float(loss.detach())
            running_n += 1
            if not sync:
                continue
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro = 0
            step += 1
            step_loss = running / max(1, running_n)
            running, running_n = 0.0, 0
            ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
            if step % log_every == 0 or step == total_steps:
                if pruning is not None:
                    sparsity = float(pruning.current_sparsity())
                lr = optimizer.param_groups[0]["lr"]
                result.history.append({"step": step, "loss": step_loss, "lr": lr, "sparsity": sparsity})
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{ema:.4f}", sparsity=f"{sparsity:.3f}",
                                samples_s=f"{result.samples_seen / max(elapsed, 1e-9):.1f}", refresh=False)
            bar.update(1)
            if env.is_main and (step % report_every == 0 or step == total_steps):
                if pruning is not None:
                    sparsity = float(pruning.current_sparsity())
                elapsed = time.perf_counter() - start
                logger.info("%s step %d/%d: loss %.4f, sparsity %.4f, lr %.3g, %.1f samples/s, %.0f s", desc, step,
                            total_steps, ema, sparsity, optimizer.param_groups[0]["lr"],
                            result.samples_seen / max(elapsed, 1e-9), elapsed)
            if on_step is not None:
                on_step(LoopPosition(step, epoch, i + 1, result.samples_seen, ema, result.history,
                                     epoch_start_state, rng_state(), epoch_end=last_of_epoch))
            if step >= total_steps:
                break
        epoch += 1
        if n_batches == 0:
            break
    result.global_step = step
    result.train_time_s = time.perf_counter() - start
    bar.close()
    return result


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, batch_size: int, collate: Callable, env: DistEnv,
            forward: Callable[[torch.nn.Module, dict], Iterable[Any]], desc: str = "eval",
            progress: bool = True) -> list[Any]:
    """Run ``forward(model, batch) -> per-example outputs`` over ``dataset`` sharded across processes and return
    the outputs of every example in dataset order, on every process."""
    from tqdm.auto import tqdm

    model = unwrap(model)
    was_training = model.training
    model.eval()
    sampler = ShardSampler(len(dataset), env.rank, env.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    outputs: list[Any] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not (progress and env.is_main),
                      dynamic_ncols=True, mininterval=1.0):
        outputs.extend(forward(model, move(batch, env.device)))
    if was_training:
        model.train()
    if not env.distributed:
        return outputs
    gathered: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, (sampler.indices, outputs))
    merged: list[Any] = [None] * len(dataset)
    for indices, outs in gathered:
        for idx, out in zip(indices, outs):
            merged[idx] = out
    return merged


def timed(fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
