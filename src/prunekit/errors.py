"""Exception types. Every user-facing error names the key, the bad value and what is allowed."""
from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable

#: the most characters of a value an error message quotes
QUOTE_LIMIT = 200


class _BoundedRepr(reprlib.Repr):
    """``repr`` that never builds more than it shows: a value is read only as deep and as wide as the quote needs
    (a YAML alias bomb shares one list a billion times; a plain ``repr`` of it takes minutes and gigabytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxtuple = self.maxlist = self.maxarray = self.maxdeque = self.maxset = self.maxfrozenset = 12
        self.maxdict = 12
        self.maxstring = self.maxother = QUOTE_LIMIT
        self.maxlong = 60

    def repr_dict(self, x: dict, level: int) -> str:
        # insertion order, as repr shows it (reprlib sorts keys)
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = []
        for i, (key, value) in enumerate(x.items()):
            if i == self.maxdict:
                items.append("...")
                break
            items.append(f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}")
        return "{" + ", ".join(items) + "}"

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # str() of a huge int is slow, and refused beyond 4300 digits
            return f"<int of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, built without a full ``repr``."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error being reported
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """A configuration value is invalid.

    The message always has the form ``<key>: got <value!r>; <allowed>`` so that a user can fix the
    config without reading prunekit's source; the value is quoted by :func:`quote` (at most
    :data:`QUOTE_LIMIT` characters, however large the value is).
    """

    def __init__(self, key: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        key = key if len(key) <= QUOTE_LIMIT else key[: QUOTE_LIMIT - 3] + "..."
        message = f"{key}: got {quote(value)}; {allowed}"
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
