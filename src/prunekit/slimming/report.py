"""What slimming removed, per layer, and everything zero it could not remove (with the reason)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from prunekit.slimming.plan import Skip


@dataclass
class FFNChange:
    name: str
    consumer: str
    producers: list[str]
    width_before: int
    width_after: int
    removed: list[int]           # removed channel indices (before slimming)


@dataclass
class AttentionChange:
    name: str
    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    removed_heads: list[int]     # removed query heads (indices before slimming)
    removed_kv_heads: list[int]  # removed key/value heads (equal to removed_heads without GQA)


@dataclass
class SlimReport:
    """Returned by :func:`prunekit.slimming.slim`."""

    ffn: list[FFNChange] = field(default_factory=list)
    attention: list[AttentionChange] = field(default_factory=list)
    not_cut: list[Skip] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    detection: str = "trace"
    trace_error: str | None = None

    @property
    def removed_params(self) -> int:
        return self.params_before - self.params_after

    @property
    def removed_heads(self) -> dict[str, list[int]]:
        return {a.name: a.removed_heads for a in self.attention}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """A plain-text summary, one line per changed block and per structure left in place."""
        lines = [f"slimming ({self.detection}): parameters {self.params_before:,} -> {self.params_after:,} "
                 f"(-{self.removed_params:,})"]
        for f in self.ffn:
            lines.append(f"  ffn  {f.consumer:<50} {f.width_before:>6} -> {f.width_after:<6}")
        for a in self.attention:
            kv = (f" (kv {a.kv_heads_before} -> {a.kv_heads_after})"
                  if a.kv_heads_before != a.heads_before else "")
            lines.append(f"  attn {a.name:<50} {a.heads_before:>6} -> {a.heads_after:<6} heads{kv}")
        for s in self.not_cut:
            shown = s.indices if len(s.indices) <= 8 else s.indices[:8] + ["..."]
            where = f" {shown} ({len(s.indices)})" if s.indices else ""
            lines.append(f"  kept {s.name}{where}: {s.reason}")
        if self.trace_error:
            lines.append(f"  note: tracing failed ({self.trace_error}); groups came from module-structure rules")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
