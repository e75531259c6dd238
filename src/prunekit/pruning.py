"""Pruning: the optimizer-like object that drives every pruner of a config.

Where things happen within optimizer step s (hooks or callbacks, both identical):

* start of step s (``on_step_begin``, or right after step s-1): events whose criterion needs no gradient
  (magnitude) and gradient criteria that already hold scores from steps < s;
* before ``optimizer.step()``: gradient criteria fold in this step's gradients; an event still due at s (a
  gradient criterion's first event, e.g. one-shot at step 0) runs now; then gradients of pruned weights are
  zeroed so optimizer state does not build up behind them;
* after ``optimizer.step()``: pruned weights are zeroed again (weight decay, leftover momentum) and the step
  counter advances. Only optimizer steps count: gradient accumulation micro-batches and evaluation forwards
  never advance the schedule.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from prunekit.config import PruningConfig, load_config
from prunekit.distributed import broadcast_masks, is_distributed
from prunekit.errors import ConfigError, SelectionError
from prunekit.masks import mark_schedule, owner_of, set_owner
from prunekit.pruner import MAX_STEP, Pruner

logger = logging.getLogger("prunekit")

STATE_VERSION = 1

#: optimizers whose update of a weight is exactly zero when the weight, its gradient and its state are zero
#: (decoupled or coupled decay of 0 is 0; Adam-style m/(sqrt(v)+eps) with m = 0 is 0). With gradients masked and
#: state zeroed at every event, their pruned weights stay zero by construction, so the per-step re-mask after
#: ``optimizer.step()`` is skipped. Any other optimizer (or none known) is re-masked every step.
_ZERO_PRESERVING = tuple(getattr(torch.optim, n) for n in
                         ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adamax"))


class Pruning:
    """Prunes ``model`` as ``config`` says, driven by training-loop callbacks or the optimizer's step hooks.

    Args:
        model: the model to prune (masks are attached to its modules as non-persistent buffers).
        config: anything :func:`prunekit.config.load_config` accepts (typed config, 2.x dicts, YAML path …).
        optimizer: optional. When given, the pruning hooks into its step (``register_step_pre_hook`` /
            ``register_step_post_hook``): scores see the gradients the optimizer really applies (unscaled by
            ``GradScaler``, never from a skipped step, once per accumulated step), its momentum-like state of
            newly pruned weights is zeroed at every event, and the ``on_before/after_optimizer_step`` callbacks
            become no-ops (calling them anyway is harmless). Without it, those two callbacks do the work; group
            lasso then still needs the optimizer's learning rate: set ``pruning.optimizer = optimizer`` (this
            records it without hooking its step) before ``on_train_begin``.
    """

    def __init__(self, model: nn.Module, config: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.config: PruningConfig = load_config(config)
        self.pruners: list[Pruner] = []
        self._layers: list | None = None
        self._replaced: list[Pruning] = []
        try:
            for i, c in enumerate(self.config.pruners):
                self.pruners.append(Pruner(model, c, f"pruner{i}", claim=self._claim))
            self._check_disjoint()
            if not self.layers:  # each pruner's pattern tiles none of its layers: nothing would ever be pruned
                raise SelectionError("no pruner of this config prunes anything; every selected layer was left "
                                     "dense: " + "; ".join(f"{p.name} ({p.config.pattern}): {p.skipped}"
                                                          for p in self.pruners))
        except Exception:
            for layer in self.layers:  # a refused config leaves the model as it found it
                layer.detach()
            raise
        for layer in self.layers:
            set_owner(layer.holder, self)
        self._replaced.clear()  # replaced Prunings are not kept alive
        self._finished: bool | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._step_lrs: dict[int, float] | None = None  # learning rates as optimizer.step() used them
        self.global_step = 0
        self._mark_finished()
        self._in_step = False  # between the before- and after-step stages
        self._missing_after_warned = False
        self._handles: list[Any] = []
        # the callback form (no optimizer given): the global step hooks armed between the two callbacks
        self._armed: list[Any] = []
        self._stepper: torch.optim.Optimizer | None = None
        self._stepped = False  # a watched optimizer step completed since on_before_optimizer_step
        self._witnessed = False  # some optimizer step ever fired hooks between the callbacks
        self._weight_ids: set[int] | None = None
        self._hook_depth = 0  # an optimizer subclass calling super().step() fires the hooks nested
        if optimizer is not None:
            self.attach(optimizer)

    def _claim(self, module: nn.Module) -> None:
        """A module about to be masked still carries an earlier Pruning's masks (prepare_pruning run twice on the
        same model, e.g. a re-run notebook cell): that Pruning is replaced, not stacked. Two live Prunings on one
        layer would both hook the optimizer, so the schedule ran twice per step (wrong sparsity) or a mask of
        another pattern met the other's shapes (a deep shape error). Replacing is safe: its hooks and masks go,
        the zeros it made stay in the weights (as after ``detach(remove_masks=True)``); refusing would leave a
        notebook user no way on except restarting the kernel."""
        old = owner_of(module)
        if old is None or old is self or old in self._replaced:
            return
        warnings.warn(f"prunekit: {type(module).__name__} layers of this model are already pruned by an earlier "
                      "Pruning (prepare_pruning / Pruning called twice on the same model?); replacing it: its "
                      "optimizer hooks and masks are removed, the zeros it made stay in the weights", stacklevel=5)
        old.detach(remove_masks=True)
        self._replaced.append(old)

    def _check_disjoint(self) -> None:
        owner: dict[str, str] = {}
        for pruner in self.pruners:
            for layer in pruner.layers:
                if layer.name in owner:
                    raise SelectionError(
                        f"layer {layer.name!r} is selected by both {owner[layer.name]} and {pruner.name}; "
                        f"give the pruners disjoint op_names / excluded_op_names")
                owner[layer.name] = pruner.name

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The training optimizer: its learning rate scales group lasso, its state of pruned weights is zeroed."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Record the optimizer (callback form). When hooked into another one, the hooks move to this one."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("optimizer", optimizer, "allowed: a torch.optim.Optimizer or None")
        if self._handles and optimizer is not self._optimizer:
            if optimizer is None:
                self.detach()
            else:
                self.attach(optimizer)
            return
        self._optimizer = optimizer

    @property
    def layers(self) -> list:
        """Every pruned layer of every pruner (built once: the step hooks walk it on every step)."""
        if self._layers is None or len(self._layers) != sum(len(p.layers) for p in self.pruners):
            self._layers = [layer for pruner in self.pruners for layer in pruner.layers]
        return self._layers

    # --- callbacks -------------------------------------------------------------------------------------------
    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        """Run the events due before the first step (e.g. one-shot magnitude pruning at step 0)."""
        self._check_learning_rate_known()
        self._run_due_events(need_ready=True)

    def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
        """No-op (pruning counts optimizer steps, not epochs)."""

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        """Events due at the start of this step. The batch index argument is ignored: steps are counted."""
        self._run_due_events(need_ready=True)

    def on_before_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Call after backward (after ``scaler.unscale_(optimizer)`` under AMP), before ``optimizer.step()``.
        A no-op when hooked into the optimizer.

        The step's work (fold gradients into scores, run events still due, mask gradients) runs when the
        optimizer really steps: until :meth:`on_after_optimizer_step`, the step hooks of any ``torch.optim``
        optimizer holding a pruned weight are watched, the same mechanism :func:`prepare_pruning` uses. So a
        step ``GradScaler`` skips (inf/NaN gradients) contributes nothing to the scores and does not advance the
        schedule. Where no optimizer step fires a hook between the two callbacks (no optimizer, a manual
        update, an optimizer that is not a ``torch.optim.Optimizer``) and none ever has, the work runs in
        :meth:`on_after_optimizer_step` instead, unless the pruned gradients are not finite (a skipped step)."""
        if self._handles:
            return
        if self._armed:  # on_after_optimizer_step was not called for the previous step
            self._warn_missing_after(stacklevel=3)
            self._resolve_callback_step()
        self._arm()

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Zero pruned weights again, advance the step counter, run events due at the next step's start (all
        only if the optimizer really stepped, see :meth:`on_before_optimizer_step`). A no-op when hooked."""
        if self._handles:
            return
        if self._armed:
            self._resolve_callback_step()
        else:  # no on_before_optimizer_step for this step: the after-step stage alone, as it always did
            self._after_step()

    # --- the callback form: which optimizer step, if any, happened between the two callbacks ------------------
    def _arm(self) -> None:
        ref = weakref.ref(self)  # the global hooks never keep a Pruning alive

        def pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me._watched_pre(optimizer)

        def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me._watched_post(optimizer)

        # torch's documented global step hooks, registered only between the two callbacks (removed in
        # on_after_optimizer_step, detach and on_train_end): which optimizer steps is not known here
        self._armed = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._stepper, self._stepped = None, False

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        if self._weight_ids is None:
            self._weight_ids = {id(layer.weight) for layer in self.layers}
        return any(id(p) in self._weight_ids for group in optimizer.param_groups for p in group["params"])

    def _watched_pre(self, optimizer: torch.optim.Optimizer) -> None:
        if self._stepper is None and not self._stepped and self._owns(optimizer):
            self._stepper = optimizer
        if optimizer is self._stepper:
            self._pre_hook()

    def _watched_post(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is self._stepper:
            self._post_hook()
            if self._hook_depth == 0:
                self._stepper, self._stepped, self._witnessed = None, True, True

    def _resolve_callback_step(self) -> None:
        """After the optimizer step (or its absence): nothing to do if a hooked step ran, nothing if the step was
        skipped, both stages now if no step ever fires hooks here."""
        self._disarm()
        stepped, self._stepper, self._stepped, self._hook_depth = self._stepped, None, False, 0
        if stepped:
            return
        if self._in_step:  # the pre hook ran but the step raised before its post hook: finish that step
            self._after_step()
            return
        if self._witnessed or not self._grads_finite():
            return  # GradScaler skipped this step (inf/NaN gradients): no scores, no step
        self._before_step()
        self._after_step()

    def _grads_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(g).all()) for layer in self.layers
                       if (g := getattr(layer.weight, "grad", None)) is not None)

    def _warn_missing_after(self, stacklevel: int) -> None:
        """Once per Pruning: a step began while the previous one still waits for on_after_optimizer_step."""
        if not self._missing_after_warned:
            warnings.warn("prunekit: on_after_optimizer_step() was not called after the last optimizer step; "
                          "advancing the step counter here", stacklevel=stacklevel)
            self._missing_after_warned = True

    def _before_step(self) -> None:
        if self._in_step:  # on_after_optimizer_step was not called for the previous step
            self._warn_missing_after(stacklevel=4)
            self._after_step()
        with torch.no_grad():
            # the gradient mask may ride along the score update, unless an event changes the masks in between
            fuse = not any(pruner.due(self.global_step) for pruner in self.pruners)
            masked: set[int] = set()
            for pruner in self.pruners:
                # scores are only read at events: skip steps too early to matter and those after the last event
                if pruner.wants_gradients(self.global_step):
                    masked |= pruner.criterion.accumulate(pruner.layers, mask_grads=fuse)
            self._run_due_events(need_ready=False)
            for layer in self.layers:
                if id(layer) not in masked:
                    layer.mask_grad_()
        self._capture_lrs()
        self._in_step = True

    def _after_step(self) -> None:
        if type(self.optimizer) not in _ZERO_PRESERVING:
            with torch.no_grad():
                for layer in self.layers:
                    layer.apply_()
        for pruner in self.pruners:
            pruner.regularize(self.global_step, self._lr_of)
        self._step_lrs = None
        self.global_step += 1
        self._in_step = False
        self._run_due_events(need_ready=True)

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        """No-op (kept for the original's loop contract)."""

    def on_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        """No-op (kept for the original's loop contract)."""

    def on_after_compute_loss(self, input: Any, student_output: Any, student_loss: Any,
                              teacher_output: Any = None) -> Any:
        """The original's distillation callback, for loops written against it: with pruning only it returned
        ``student_loss`` unchanged, and so does this (distil in the loop, see :mod:`prunekit.recipes.distill`)."""
        return student_loss

    def on_before_eval(self, *args: Any, **kwargs: Any) -> None:
        """Before an evaluation: the masks are applied to the weights once more (a no-op unless the weights were
        changed outside the optimizer step), so evaluation sees the pruned model. The step counter, scores and
        masks are left alone: evaluation never advances pruning (the original's hook did nothing at all)."""
        with torch.no_grad():
            for layer in self.layers:
                layer.apply_()

    def on_after_eval(self, *args: Any, **kwargs: Any) -> None:
        """No-op (kept for the original's loop contract): the masks stay applied after an evaluation."""

    def on_train_end(self, *args: Any, print_report: bool = True, **kwargs: Any):
        """Apply the final masks once more and print (and return) the sparsity report."""
        if self._armed:
            self._resolve_callback_step()
        with torch.no_grad():
            for layer in self.layers:
                layer.apply_()
        report = self.report()
        if print_report:
            print(report.table())
        return report

    # --- learning rate (group lasso) ----------------------------------------------------------------------
    def _check_learning_rate_known(self) -> None:
        """Group lasso shrinks by lr · reg_coeff: without the optimizer there is no lr, so refuse up front
        (a guessed lr of 1.0 zeroed 97 % of a layer in two steps at lr 1e-4)."""
        if self._optimizer is not None:
            return
        lasso = [p.name for p in self.pruners if p.config.reg_type is not None and p.config.reg_coeff > 0.0]
        if lasso:
            raise ConfigError(
                "optimizer", None,
                "allowed: the training optimizer, whose learning rate scales group lasso's shrink: "
                "Pruning(model, config, optimizer), prepare_compression(model, config, optimizer=optimizer) "
                "or pruning.optimizer = optimizer before on_train_begin",
                f"reg_type 'group_lasso' in {', '.join(lasso)} and no optimizer given")

    def _capture_lrs(self) -> None:
        """Just before ``optimizer.step()``: the learning rates it is about to use (a scheduler stepped between
        ``optimizer.step()`` and ``on_after_optimizer_step`` must not change the shrink of this step)."""
        self._step_lrs = None
        if self._optimizer is None or not any(p.regularizes(self.global_step) for p in self.pruners):
            return
        self._step_lrs = {id(param): float(group["lr"])
                          for group in self._optimizer.param_groups for param in group["params"]}

    def _lr_of(self, param: torch.nn.Parameter) -> float | None:
        """The learning rate the optimizer used for ``param`` in this step; None when it does not update it."""
        self._check_learning_rate_known()
        lrs = self._step_lrs
        if lrs is None:  # on_before_optimizer_step was not called: the optimizer's lr as it is now
            lrs = {id(p): float(g["lr"]) for g in self._optimizer.param_groups for p in g["params"]}
        return lrs.get(id(param))

    # --- events ----------------------------------------------------------------------------------------------
    def _mark_finished(self) -> None:
        """Tell the masked modules whether their schedule still runs. Once no event can change a mask again the
        masks are final and their zeros are in the weights, so ``slim`` / ``model_slim`` fold them (as in the
        original, where nothing else is needed after ``on_train_end``); while one runs, slimming refuses."""
        finished = all(p.finished(self.global_step) for p in self.pruners)
        if finished is self._finished:
            return
        self._finished = finished
        for pruner in self.pruners:
            for layer in pruner.layers:
                mark_schedule(layer.holder, layer.buffer, None if finished else pruner.schedule.final_step)

    def _run_due_events(self, need_ready: bool) -> None:
        for pruner in self.pruners:
            if not pruner.due(self.global_step):
                continue
            if not pruner.ready():
                if need_ready:
                    continue  # a gradient criterion with no scores yet: runs before this step's update
                warnings.warn(f"prunekit: {pruner.name} has no gradient scores at step {self.global_step} "
                              "(no gradient reached its layers); its event is skipped", stacklevel=3)
                pruner.last_event_step = self.global_step
                continue
            pruner.prune(self.global_step)  # computes and applies the new masks
            if is_distributed():  # rank 0's masks win, so every rank must re-apply them
                broadcast_masks(pruner.layers)
                for layer in pruner.layers:
                    layer.apply_()
            if self.optimizer is not None:
                for layer in pruner.layers:
                    layer.mask_optimizer_state_(self.optimizer)
        if not self._finished:
            self._mark_finished()

    # --- queries ---------------------------------------------------------------------------------------------
    def current_sparsity(self) -> float:
        """Element sparsity over every pruned layer, as the masks say."""
        layers = self.layers
        return sum(l.zeros() for l in layers) / max(1, sum(l.numel for l in layers))

    def report(self):
        """The sparsity report of the model (see :func:`prunekit.sparsity_report`)."""
        from prunekit.report import sparsity_report

        return sparsity_report(self.model, self)

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, criterion scores, step counter and event history: everything needed for an exact resume."""
        return {
            "version": STATE_VERSION,
            "global_step": self.global_step,
            "config": self.config.to_dict(),
            "pruners": [p.state_dict() for p in self.pruners],
        }

    def check_state(self, state: Any) -> None:
        """Validate a saved state like a config: ConfigError naming the key, the value and what is allowed.

        Everything :meth:`load_state_dict` reads is checked (version, step counter, per pruner its layers, mask
        shapes and dtypes, finite scores of the right shapes, event history) before anything is changed."""
        if not isinstance(state, Mapping):
            raise ConfigError("pruning state", type(state).__name__, "allowed: a dict made by Pruning.state_dict()")
        if state.get("version") != STATE_VERSION:
            raise ConfigError("version", state.get("version"), f"allowed: {STATE_VERSION} (the pruning state "
                                                               "version this prunekit reads)")
        step = state.get("global_step")
        if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= MAX_STEP):
            raise ConfigError("global_step", step, f"allowed: an int in [0, {MAX_STEP}]")
        pruners = state.get("pruners")
        if not isinstance(pruners, (list, tuple)) or len(pruners) != len(self.pruners):
            count = len(pruners) if isinstance(pruners, (list, tuple)) else pruners
            raise ConfigError("pruners", count, f"allowed: a list of {len(self.pruners)} pruner states (this "
                                                f"config has {len(self.pruners)} pruners)")
        for i, (pruner, pstate) in enumerate(zip(self.pruners, pruners)):
            pruner.check_state(pstate, step, f"pruners[{i}]")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the masks are applied to the weights at once. The whole state is checked
        first (:meth:`check_state`): a refused state leaves this object and the model untouched."""
        self.check_state(state)
        for pruner, pstate in zip(self.pruners, state["pruners"]):
            pruner.load_state_dict(pstate, state["global_step"])
        self.global_step = int(state["global_step"])
        self._in_step = False
        self._mark_finished()

    # --- optimizer hooks -------------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruning":
        """Drive the before/after-step stages from ``optimizer``'s own step hooks (no monkey-patching)."""
        if self.optimizer is optimizer and self._handles:
            return self
        self.detach()
        self.optimizer = optimizer
        self._handles.append(optimizer.register_step_pre_hook(lambda opt, a, k: self._pre_hook()))
        self._handles.append(optimizer.register_step_post_hook(lambda opt, a, k: self._post_hook()))
        return self

    def _pre_hook(self) -> None:
        self._hook_depth += 1
        if self._hook_depth == 1:  # the outermost step call only
            self._before_step()

    def _post_hook(self) -> None:
        self._hook_depth = max(0, self._hook_depth - 1)
        if self._hook_depth == 0:
            self._after_step()

    def detach(self, remove_masks: bool = False) -> None:
        """Remove the optimizer hooks; with ``remove_masks`` also the mask buffers (zeros stay in weights)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._disarm()
        if remove_masks:
            for layer in self.layers:
                layer.detach()


def prepare_pruning(model: nn.Module, config: Any, optimizer: torch.optim.Optimizer) -> Pruning:
    """One call: after it, a plain PyTorch loop (forward, backward, ``optimizer.step()``) prunes ``model``.

    The returned :class:`Pruning` is hooked into ``optimizer.step`` through
    ``register_step_pre_hook`` / ``register_step_post_hook``; events due at step 0 that need no gradient run
    now. Call ``pruning.on_train_end()`` for the final report, ``pruning.state_dict()`` to checkpoint.
    """
    pruning = Pruning(model, config, optimizer)
    pruning.on_train_begin()
    return pruning
