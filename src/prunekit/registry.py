"""A tiny name → factory registry, used for patterns and criteria instead of if-chains."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from prunekit.errors import ConfigError, nearest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a ConfigError that lists the valid ones."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.key} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = nearest(name, self._items)
            raise ConfigError(
                self.key, name, f"allowed: {', '.join(sorted(self._items))}",
                f"did you mean {close!r}?" if close else None,
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
