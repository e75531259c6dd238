"""Hugging Face ``Trainer`` integration: prune while a ``Trainer`` trains, with one line.

    from prunekit.integrations.transformers import PruningCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[PruningCallback({"target_sparsity": 0.9, "pattern": "4x1",
                                                  "start_step": 100, "end_step": 1000, "pruning_frequency": 50})])
    trainer.train()
    # or: trainer.add_callback(PruningCallback(config))

Step numbers are the Trainer's optimizer steps (``state.global_step``; gradient-accumulation micro-batches do not
count). The callback maps the Trainer's events onto :class:`prunekit.Pruning`'s explicit callbacks:

==========================  ==========================================
Trainer event               Pruning callback
==========================  ==========================================
``on_train_begin``          ``on_train_begin`` (built here, on the model)
``on_epoch_begin/_end``     ``on_epoch_begin`` / ``on_epoch_end``
``on_step_begin``           ``on_step_begin``
``on_pre_optimizer_step``   ``on_before_optimizer_step`` (after gradient clipping)
``on_optimizer_step``       ``on_after_optimizer_step``
``on_step_end``             ``on_step_end``
``on_train_end``            ``on_train_end`` (report kept in ``.report``)
==========================  ==========================================

Checkpoints: ``on_save`` writes ``pruning_state.pt`` into the Trainer's ``checkpoint-<step>`` folder, and a run
resumed from such a checkpoint (``trainer.train(resume_from_checkpoint=...)``) reloads it, so masks, scores and
the schedule continue exactly. The current sparsity is added to the Trainer's logs as ``sparsity``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from prunekit.safe_load import load_torch_file

logger = logging.getLogger("prunekit")

STATE_FILE = "pruning_state.pt"

__all__ = ["PruningCallback"]


def _checkpoint_dir(args, state) -> str:
    try:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    except ImportError:  # pragma: no cover
        PREFIX_CHECKPOINT_DIR = "checkpoint"
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class PruningCallback(TrainerCallback):
    """A ``TrainerCallback`` that prunes the Trainer's model as ``config`` says.

    Args:
        config: anything :func:`prunekit.load_config` accepts (a :class:`prunekit.PruningConfig`, the original's
            2.x dict form, a list of pruner dicts, a YAML path or text). Validated at once.
        save_state: write ``pruning_state.pt`` into each Trainer checkpoint (and reload it when resuming).
        log_sparsity: add the current sparsity of the pruned layers to the Trainer's logs.

    After training, :attr:`pruning` holds the :class:`prunekit.Pruning` and :attr:`report` its sparsity report.
    """

    def __init__(self, config: Any, *, save_state: bool = True, log_sparsity: bool = True) -> None:
        from prunekit.config import load_config

        self.config = load_config(config)
        self.save_state = save_state
        self.log_sparsity = log_sparsity
        self.pruning = None
        self.report = None

    # --- life cycle ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from prunekit.pruning import Pruning

        if model is None:
            raise RuntimeError("PruningCallback: the Trainer passed no model to on_train_begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if self.pruning is None or self.pruning.model is not model:
            self.pruning = Pruning(model, self.config, optimizer=inner)
        elif inner is not None and inner is not self.pruning.optimizer:
            # a second train() builds a new optimizer: move the hooks to it (setting the attribute left them
            # on the old one, so the new optimizer's steps were never pruned)
            self.pruning.attach(inner)
        if state.global_step > 0:
            self._resume(args, state)
        self.pruning.on_train_begin()

    def _resume(self, args, state) -> None:
        path = os.path.join(_checkpoint_dir(args, state), STATE_FILE)
        if os.path.isfile(path):
            # weights_only: a planted checkpoint must not run code; prunekit's state is plain data
            self.pruning.load_state_dict(load_torch_file(path, "pruning state"))
            logger.info("prunekit: resumed pruning state from %s (step %d)", path, self.pruning.global_step)
        elif self.pruning.global_step != state.global_step:
            logger.warning("prunekit: resuming at step %d without %s; the schedule continues from there but "
                           "masks are rebuilt at the next event", state.global_step, path)
            self.pruning.global_step = state.global_step

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_epoch_begin()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_step_begin()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.pruning is not None:
            self.pruning.on_epoch_end()

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruning is None:
            return
        self.report = self.pruning.on_train_end(print_report=False)
        if state.is_world_process_zero:
            logger.info("prunekit sparsity report\n%s", self.report.table())

    # --- logs and checkpoints --------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pruning is None or not self.log_sparsity or logs is None:
            return
        sparsity = round(float(self.pruning.current_sparsity()), 6)
        logs["sparsity"] = sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = sparsity

    def on_save(self, args, state, control, **kwargs):
        if self.pruning is None or not self.save_state or not state.is_world_process_zero:
            return
        folder = _checkpoint_dir(args, state)
        if os.path.isdir(folder):
            torch.save(self.pruning.state_dict(), os.path.join(folder, STATE_FILE))
