"""Exception types. Every user-facing error names the key, the bad value and what is allowed."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """A configuration value is invalid.

    The message always has the form ``<key>: got <value!r>; <allowed>`` so that a user can fix the
    config without reading prunekit's source.
    """

    def __init__(self, key: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        message = f"{key}: got {value!r}; {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class SelectionError(PrunekitError, ValueError):
    """A layer selection matched nothing, or matched something that cannot be pruned."""


class SlimmingError(PrunekitError, RuntimeError):
    """A structure cannot be removed physically."""


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the closest candidate to ``name`` (for 'did you mean' hints), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None
