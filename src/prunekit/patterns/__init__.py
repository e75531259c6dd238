"""Pruning patterns, parsed from config strings through a registry of forms.

``parse_pattern("4x1")`` → block pattern; ``"channelx1"`` / ``"1xchannel"`` → input / output channels;
``"2:4"`` → N:M; ``"mha"`` → attention heads. Text before the last ``_`` is ignored, as in the original
(``tile_pattern_4x1`` ≡ ``4x1``).
"""
from __future__ import annotations

import re
from typing import Callable

from prunekit.errors import ConfigError
from prunekit.patterns.base import BoundPattern, Pattern
from prunekit.patterns.blocks import BlockBound, BlockPattern
from prunekit.patterns.nm import NMBound, NMPattern

_FORMS: list[tuple[re.Pattern[str], str, Callable[[str, re.Match[str]], Pattern]]] = []


def register_form(regex: str, description: str) -> Callable:
    """Register a factory for pattern strings that fully match ``regex``."""
    def deco(factory: Callable[[str, re.Match[str]], Pattern]) -> Callable:
        _FORMS.append((re.compile(regex), description, factory))
        return factory
    return deco


def _positive(spec: str, *values: int) -> None:
    if any(v <= 0 for v in values):
        raise ConfigError("pattern", spec, "block sizes must be positive integers, e.g. 4x1, 1x4, 2x2")


@register_form(r"(\d+)x(\d+)", "NxM blocks of N output rows x M input columns (1x1 = unstructured)")
def _nxm(spec: str, m: re.Match[str]) -> Pattern:
    rows, cols = int(m.group(1)), int(m.group(2))
    _positive(spec, rows, cols)
    return BlockPattern(spec, rows, cols)


@register_form(r"channelx(\d+)", "channelxM: whole input channels (M columns across all rows)")
def _in_channels(spec: str, m: re.Match[str]) -> Pattern:
    cols = int(m.group(1))
    _positive(spec, cols)
    return BlockPattern(spec, None, cols)


@register_form(r"(\d+)xchannel", "Nxchannel: whole output channels (N rows across all columns)")
def _out_channels(spec: str, m: re.Match[str]) -> Pattern:
    rows = int(m.group(1))
    _positive(spec, rows)
    return BlockPattern(spec, rows, None)


@register_form(r"(\d+):(\d+)", "N:M, N zeros in every M consecutive inputs, 0 < N < M (2:4, 1:4, 4:8)")
def _n_m(spec: str, m: re.Match[str]) -> Pattern:
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ConfigError("pattern", spec, "N:M needs 0 < N < M, e.g. 2:4, 1:4, 4:8")
    return NMPattern(spec, n, mm)


@register_form(r"mha", "mha: whole attention heads")
def _heads(spec: str, m: re.Match[str]) -> Pattern:
    from prunekit.patterns.heads import HeadPattern  # heads need attention detection; load it only when used

    return HeadPattern(spec)


def normalize_spec(spec: str) -> str:
    """Drop the original's decorative prefix (``tile_pattern_4x1`` → ``4x1``)."""
    return spec.strip().rsplit("_", 1)[-1]


def parse_pattern(spec: str) -> Pattern:
    """Parse a pattern string; raises ConfigError naming the allowed forms."""
    if not isinstance(spec, str):
        raise ConfigError("pattern", spec, "a pattern string such as '4x1', '2:4', 'channelx1' or 'mha'")
    core = normalize_spec(spec)
    for regex, _, factory in _FORMS:
        match = regex.fullmatch(core)
        if match:
            return factory(core, match)
    allowed = "; ".join(desc for _, desc, _ in _FORMS)
    raise ConfigError("pattern", spec, f"allowed forms: {allowed}")


__all__ = ["Pattern", "BoundPattern", "BlockPattern", "BlockBound", "NMPattern", "NMBound",
           "parse_pattern", "normalize_spec", "register_form"]
