"""The result of a one-shot run: per-layer sparsity (prunekit.report's SparsityReport), time and memory."""
from __future__ import annotations

import json
import resource
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.report import SparsityReport


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class OneShotReport:
    """What :func:`prunekit.oneshot` did. ``sparsity`` has one row per pruned linear (element sparsity measured
    on the weights, block sparsity from the mask); ``layer_targets`` the profile's sparsity per block."""

    method: str
    pattern: str
    target_sparsity: float
    profile: str
    sparsity: SparsityReport
    layer_targets: dict[str, float] = field(default_factory=dict)
    nsamples: int = 0
    seqlen: int = 0
    model: str = ""
    streamed: bool = False
    device: str = "cpu"
    output_dir: str | None = None
    wall_time_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "sparsity"}
        data["sparsity"] = self.sparsity.to_dict()
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The sparsity table plus a summary of the run (for terminals and logs)."""
        lines = [self.sparsity.table(), "",
                 f"method {self.method}, pattern {self.pattern}, target {self.target_sparsity:.4f} "
                 f"({self.profile}), {self.nsamples} x {self.seqlen} calibration tokens, device {self.device}"
                 + (", streamed from safetensors" if self.streamed else ""),
                 f"wall time {self.wall_time_s:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
                 + (f", peak GPU {self.peak_gpu_bytes / 2**20:.0f} MiB" if self.peak_gpu_bytes else "")]
        if self.perplexity:
            lines.append("perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in self.perplexity.items()))
        if self.output_dir:
            lines.append(f"pruned model: {self.output_dir}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path | None:
        """A bar chart of each pruned linear's element sparsity (PNG); None if matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("prunekit: matplotlib is not installed; report.png not written", stacklevel=2)
            return None
        rows = self.sparsity.layers
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(rows) + 2), 4), dpi=100)
        ax.bar(range(len(rows)), [r.element_sparsity for r in rows], width=0.9, color="#3b6ea5")
        ax.axhline(self.target_sparsity, color="#c0392b", lw=1, ls="--", label=f"target {self.target_sparsity:g}")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("element sparsity")
        ax.set_xlabel(f"pruned linears, in model order ({len(rows)})")
        ax.set_title(f"{self.method} {self.pattern}, {self.profile}: "
                     f"{self.sparsity.pruned_layers_sparsity:.4f} over pruned layers")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def save(self, directory: str | Path) -> None:
        """Write ``report.json`` and ``report.png`` into ``directory``."""
        directory = Path(directory)
        (directory / "report.json").write_text(self.to_json(), encoding="utf-8")
        self.plot(directory / "report.png")


def gpu_peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
