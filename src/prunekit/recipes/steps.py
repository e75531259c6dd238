"""Step numbers from epochs, as the original example scripts derived them.

``iters = len(train_dataset) / total_batch`` (a float; ``total_batch`` = per-device batch x processes x gradient
accumulation), ``start = int(warm_epochs * iters) + start_offset`` (the QA script adds ``--num_warmup_steps``),
``end = int(iters * (epochs - cooldown_epochs))``, ``frequency = int((end - start + 1) / 40)`` for
``--pruning_frequency -1`` (about 40 pruning events). A "step" is an optimizer step. Without ``--do_prune`` no
pruning happens at all.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prunekit.recipes.common import RecipeError

#: ``--pruning_frequency -1``: about this many pruning events between start and end.
AUTO_FREQUENCY_EVENTS = 40


@dataclass(frozen=True)
class StepPlan:
    num_train_samples: int
    total_batch_size: int
    iters_per_epoch: float  # the original's float len/total_batch
    steps_per_epoch: int  # optimizer steps one epoch really takes
    total_steps: int  # optimizer steps of the whole run
    do_prune: bool
    start_step: int
    end_step: int
    pruning_frequency: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_steps(num_train_samples: int, per_device_batch_size: int, num_train_epochs: float, *,
               world_size: int = 1, gradient_accumulation_steps: int = 1, do_prune: bool = True,
               sparsity_warm_epochs: float = 0.0, cooldown_epochs: float = 0.0, pruning_frequency: int = -1,
               start_offset: int = 0) -> StepPlan:
    """Turn the epoch flags into optimizer-step numbers; raise :class:`RecipeError` for impossible ones."""
    if num_train_samples <= 0:
        raise RecipeError("the training set is empty (check --max_train_samples and the data)")
    if per_device_batch_size <= 0:
        raise RecipeError(f"--per_device_train_batch_size: got {per_device_batch_size}; must be >= 1")
    if gradient_accumulation_steps <= 0:
        raise RecipeError(f"--gradient_accumulation_steps: got {gradient_accumulation_steps}; must be >= 1")
    if num_train_epochs <= 0:
        raise RecipeError(f"--num_train_epochs: got {num_train_epochs}; must be > 0")
    total_batch = per_device_batch_size * world_size * gradient_accumulation_steps
    iters = num_train_samples / total_batch
    # What the loop does: each process gets ceil(N / world) samples, in ceil(./batch) micro-batches.
    per_rank = math.ceil(num_train_samples / world_size)
    micro_batches = math.ceil(per_rank / per_device_batch_size)
    steps_per_epoch = math.ceil(micro_batches / gradient_accumulation_steps)
    total_steps = max(1, math.ceil(steps_per_epoch * num_train_epochs - 1e-9))
    if not do_prune:
        never = total_steps + 1
        return StepPlan(num_train_samples, total_batch, iters, steps_per_epoch, total_steps, False, never, never, 1)
    if sparsity_warm_epochs < 0 or cooldown_epochs < 0:
        raise RecipeError("--sparsity_warm_epochs and --cooldown_epochs must be >= 0")
    start = int(sparsity_warm_epochs * iters) + int(start_offset)
    end = int(iters * (num_train_epochs - cooldown_epochs))
    if end < start:
        raise RecipeError(
            f"pruning would end (step {end}) before it starts (step {start}): --sparsity_warm_epochs "
            f"({sparsity_warm_epochs}) + --cooldown_epochs ({cooldown_epochs}) leave no room in --num_train_epochs "
            f"({num_train_epochs}) with {iters:.1f} steps per epoch")
    if end >= total_steps + 1:
        end = total_steps  # never schedule past the last optimizer step
        start = min(start, end)
    if pruning_frequency == -1:
        frequency = max(1, int((end - start + 1) / AUTO_FREQUENCY_EVENTS))
    elif pruning_frequency >= 1:
        frequency = int(pruning_frequency)
    else:
        raise RecipeError(f"--pruning_frequency: got {pruning_frequency}; give a step count >= 1 or -1 (about "
                          f"{AUTO_FREQUENCY_EVENTS} pruning events)")
    return StepPlan(num_train_samples, total_batch, iters, steps_per_epoch, total_steps, True, start, end, frequency)
