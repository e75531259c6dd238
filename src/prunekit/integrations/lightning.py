"""Lightning callback: ``Trainer(callbacks=[PruningCallback(config)])``.

The pruning is hooked into the LightningModule's optimizer step hooks, so gradient accumulation, precision
plugins (which unscale before stepping) and skipped steps behave as in a plain loop. The pruning state
(masks, scores, step) is saved in Lightning checkpoints and restored on resume.
"""
from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package name
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from prunekit.pruning import Pruning


class PruningCallback(Callback):
    """Prunes the LightningModule as ``config`` says (anything :func:`prunekit.load_config` accepts)."""

    def __init__(self, config: Any, print_report: bool = True) -> None:
        self.config = config
        self.print_report = print_report
        self.pruning: Pruning | None = None
        self._pending_state: dict | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"PruningCallback supports one optimizer; this module configures "
                             f"{len(trainer.optimizers)}")
        self.pruning = Pruning(pl_module, self.config, trainer.optimizers[0])
        if self._pending_state is not None:
            self.pruning.load_state_dict(self._pending_state)
            self._pending_state = None
        self.pruning.on_train_begin()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.pruning is not None:
            self.pruning.on_train_end(print_report=self.print_report and trainer.is_global_zero)
            self.pruning.detach()

    def state_dict(self) -> dict[str, Any]:
        return self.pruning.state_dict() if self.pruning is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.pruning is None:  # restored before fit start: apply once the pruning exists
            self._pending_state = state_dict
        else:
            self.pruning.load_state_dict(state_dict)
