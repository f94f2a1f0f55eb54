"""One registry for every family of pluggable policies (dispatch, scaling,
pairing, request selection): registered by name, one declared default, and
the names a CLI offers and the docs list, all read from the same place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownPolicy(ValueError):
    """A policy name that is not registered (the user's error)."""


@dataclass
class Registry(Generic[T]):
    """Policies of one family by name. ``register`` is a decorator; the first
    policy registered with ``default=True`` is the family's default."""

    family: str
    """What these are, for messages: "dispatch policy", "scaling policy"."""
    _entries: dict[str, T] = field(default_factory=dict)
    _docs: dict[str, str] = field(default_factory=dict)
    _default: str | None = None

    def register(self, name: str, *, default: bool = False) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise TypeError(f"{self.family} {name!r} registered twice")
            if default and self._default is not None:
                raise TypeError(f"{self.family}: two defaults ({self._default!r}, {name!r})")
            self._entries[name] = entry
            self._docs[name] = _first_line(getattr(entry, "__doc__", None))
            if default:
                self._default = name
            return entry

        return add

    @property
    def default(self) -> str:
        if self._default is None:
            raise LookupError(f"no default {self.family} is registered")
        return self._default

    def names(self) -> list[str]:
        """Every registered name, sorted (a CLI's choices)."""
        return sorted(self._entries)

    def get(self, name: str | None = None) -> T:
        """The policy called ``name`` (the default if None)."""
        key = self.default if name is None else name
        try:
            return self._entries[key]
        except KeyError:
            raise UnknownPolicy(
                f"unknown {self.family} {key!r}; choose one of {self.names()}"
            ) from None

    def describe(self) -> str:
        """One line per policy, the default marked: for ``--help`` and docs."""
        return "; ".join(
            f"{n}{' (default)' if n == self._default else ''}: {self._docs[n]}".rstrip(": ")
            for n in self.names()
        )


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0].rstrip(".")
