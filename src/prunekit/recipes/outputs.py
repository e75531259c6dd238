"""What a recipe run leaves in ``--output_dir``.

* the model and tokenizer (``save_pretrained``, safetensors): loadable by plain transformers, no prunekit needed;
* ``pruning_state.pt``: ``Pruning.state_dict()`` (masks, scores, step counter), for resuming or inspection;
* ``metrics.json``: dense and final metrics, relative change, sparsity, step plan, times;
* ``sparsity_report.json`` and ``sparsity_report.png`` (sparsity per layer; sparsity and loss over steps);
* ``history.json`` (loss, learning rate and sparsity over steps), ``run_args.json`` and the log ``train.log``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from prunekit.recipes.common import RecipeError

logger = logging.getLogger("prunekit.recipes")

#: Files a run writes; their presence marks a folder as holding a previous run.
RUN_FILES = ("metrics.json", "pruning_state.pt", "sparsity_report.json", "sparsity_report.png", "history.json",
             "run_args.json", "train.log", "config.json", "model.safetensors")
LOG_NAME = "train.log"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a folder that is not empty unless ``overwrite``; nothing is written here."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output_dir: {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        marker = next((name for name in RUN_FILES if (out / name).exists()), None)
        what = f"holds a previous run ({marker})" if marker else "is not empty"
        raise RecipeError(f"--output_dir: {str(out)!r} {what}; pass --overwrite_output_dir to replace it, or choose "
                          "another folder")
    return out


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create the folder; with ``overwrite`` remove the previous run's own files so none is left stale."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_file():
                target.unlink()


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLog:
    """Console logging at once, and the same records in ``<output_dir>/train.log`` once the folder exists
    (records from before are replayed into it)."""

    def __init__(self, is_main: bool = True, level: int = logging.INFO):
        self.logger = logging.getLogger("prunekit")
        self.is_main = is_main
        self.buffer = _Buffer()
        self.console = logging.StreamHandler(sys.stderr)
        self.console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.file: logging.Handler | None = None
        self._old_level = self.logger.level
        self.logger.setLevel(level)
        if is_main:
            self.logger.addHandler(self.console)
        self.logger.addHandler(self.buffer)

    def attach(self, out: Path, append: bool = False) -> None:
        """Write the log to ``out/train.log`` from now on; ``append`` keeps an earlier run's lines (resume)."""
        if not self.is_main:
            return
        handler = logging.FileHandler(out / LOG_NAME, mode="a" if append else "w", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        for record in self.buffer.records:
            handler.handle(record)
        self.logger.removeHandler(self.buffer)
        self.logger.addHandler(handler)
        self.file = handler

    def close(self) -> None:
        for handler in (self.console, self.buffer, self.file):
            if handler is not None:
                self.logger.removeHandler(handler)
                handler.close()
        self.logger.setLevel(self._old_level)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item())
        except Exception:  # noqa: BLE001
            pass
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def relative_change(dense: float | None, final: float | None) -> float | None:
    if dense is None or final is None or dense == 0:
        return None
    return (final - dense) / abs(dense)


def report_dict(report) -> dict:
    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return dict(report)


def _layer_rows(report) -> list[tuple[str, float]]:
    rows = []
    for layer in getattr(report, "layers", None) or report_dict(report).get("layers", []):
        get = layer.get if isinstance(layer, dict) else lambda k, d=None, _l=layer: getattr(_l, k, d)
        rows.append((str(get("name")), float(get("element_sparsity", 0.0) or 0.0)))
    return rows


def plot_report(path: Path, report, history: list[dict], title: str = "", target: float | None = None) -> bool:
    """Sparsity per layer (left) and sparsity and loss over steps (right) as one PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", path.name)
        return False
    rows = _layer_rows(report) if report is not None else []
    fig, (ax_layers, ax_steps) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.18 * len(rows) + 1.5)))
    if rows:
        names = [name for name, _ in rows]
        values = [value for _, value in rows]
        ax_layers.barh(range(len(rows)), values, color="#4c72b0")
        ax_layers.set_yticks(range(len(rows)))
        ax_layers.set_yticklabels(names, fontsize=max(4, min(8, int(400 / max(1, len(rows))))))
        ax_layers.invert_yaxis()
        ax_layers.set_xlim(0, 1)
    ax_layers.set_xlabel("element sparsity")
    ax_layers.set_title("sparsity per layer")
    steps = [h["step"] for h in history]
    ax_steps.plot(steps, [h.get("sparsity", 0.0) for h in history], color="#c44e52", label="sparsity")
    if target:
        ax_steps.axhline(target, color="#c44e52", linestyle=":", linewidth=1, label="target")
        ax_layers.axvline(target, color="#c44e52", linestyle=":", linewidth=1)
    ax_steps.set_ylim(0, 1)
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel("sparsity (pruned layers)", color="#c44e52")
    ax_loss = ax_steps.twinx()
    ax_loss.plot(steps, [h.get("loss", float("nan")) for h in history], color="#55a868", alpha=0.8, label="loss")
    ax_loss.set_ylabel("training loss", color="#55a868")
    ax_steps.set_title("sparsity and loss over steps")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_model(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` with safetensors: the masked weights are plain zeros, no prunekit needed to load."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
