"""A small name -> object registry with lazy ``"module:attr"`` entries and helpful errors."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from moca_eval.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to objects; unknown names raise with close matches.

    Entries may be given lazily as ``"package.module:attribute"`` strings so that
    registering a protocol never imports its heavy dependencies.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T | str, *, aliases: tuple[str, ...] = ()) -> None:
        """Add ``entry`` under ``name``; a name already taken is an error."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name

    def names(self) -> list[str]:
        """Canonical names, in registration order."""
        return list(self._entries)

    def canonical(self, name: str) -> str:
        """Resolve an alias; unknown names raise ``ConfigError`` naming close matches."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = [*self._entries, *self._aliases]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self._entries)})")

    def get(self, name: str) -> T:
        """The object registered under ``name``, importing lazy entries on first use."""
        key = self.canonical(name)
        entry = self._entries[key]
        if isinstance(entry, str) and ":" in entry:
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[key] = entry
        return entry  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
