"""A plugin registry in the style of timm's: register, list with an fnmatch filter, create by name.

Entries come from `register` and from the entry-point group of the registry (built-in adapters
use the same group as third-party packages), loaded lazily on first use.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from medtta.errors import RegistryError


def check_keys(owner: type, given: dict[str, Any], noun: str) -> None:
    """Fail, naming the known ones, when a key of `given` is not in `owner.defaults`, or when a number is expected
    and something else is given."""
    unknown = sorted(set(given) - set(owner.defaults))
    if unknown:
        known = ", ".join(owner.defaults) or "none"
        raise RegistryError(f"{owner.__name__} has no {noun} {', '.join(unknown)} (known: {known})")
    for key, value in given.items():
        default = owner.defaults[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RegistryError(f"{owner.__name__} {noun} {key} expects a number, got {value!r}")


class Registry:
    """Named factories of one kind (e.g. adapters), discovered from an entry-point group."""

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._entries: dict[str, Any] = {}  # name -> class, or its entry point until first loaded
        self._discovered = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator registering a factory under `name`."""

        def decorator(cls: type) -> type:
            self._entries[name] = cls
            return cls

        return decorator

    def _discover(self) -> None:
        if not self._discovered:
            for ep in entry_points(group=self.group):
                self._entries.setdefault(ep.name, ep)
            self._discovered = True

    def list(self, filter: str = "*") -> list[str]:  # noqa: A002 - timm's name for it
        """Registered names matching an fnmatch pattern, sorted."""
        self._discover()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, filter))

    def check(self, name: str) -> None:
        """Fail, listing the available names, when `name` is unknown; loads nothing."""
        self._discover()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} '{name}' (available: {', '.join(self.list())})")

    def get(self, name: str) -> type:
        """The factory registered under `name`; an unknown name fails listing the available ones."""
        self.check(name)
        entry = self._entries[name]
        if not isinstance(entry, type):  # an entry point (some packages swap in importlib_metadata's class)
            try:
                entry = self._entries[name] = entry.load()
            except Exception as err:  # a broken plugin must not look like a medtta bug
                raise RegistryError(f"{self.kind} '{name}' from entry point '{entry.value}' failed to load: "
                                    f"{type(err).__name__}: {err}") from None
        return entry

    def describe(self, name: str) -> str:
        """First paragraph of the factory's docstring, on one line."""
        doc = (self.get(name).__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the factory registered under `name`."""
        return self.get(name)(*args, **kwargs)


ADAPTERS = Registry("medtta.adapters", "adapter")
ARCHITECTURES = Registry("medtta.architectures", "architecture")
