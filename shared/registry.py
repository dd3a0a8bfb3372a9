"""Registries of pluggable parts: each backend is a name and the path of its code, imported only when chosen.

One `Registry` per kind of part (KV data planes, dispatchers, grouped GEMMs, EPLB policies, gateway routers).
A kind's registration lines sit in one module that imports nothing heavy, so a parser can offer `names()` as
its choices without importing torch or any backend:

    GEMMS = Registry("grouped GEMM")
    GEMMS.register("torch", "moemesh.ep.experts:TorchGroupedGemm")
    GEMMS.names()        # ("torch",): nothing imported
    GEMMS.load("torch")  # imports moemesh.ep.experts now; returns the class

Keyword arguments of `register` are data about the backend (`names(cross_process=True)` filters on them).
A target may also be a bare module path, whose attributes the caller picks (`load(name, "UcxSender")`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


class BackendUnavailable(RuntimeError):
    """A chosen backend's module could not be imported (its package is missing or broken)."""


@dataclass(frozen=True)
class Entry:
    """One registered backend: `module` (dotted path), `attr` (None: the module itself), `info` its data."""

    name: str
    module: str
    attr: str | None
    info: Mapping[str, Any]

    @property
    def target(self) -> str:
        return f"{self.module}:{self.attr}" if self.attr else self.module


class Registry:
    """Backends of one kind by name, in registration order; see the module's docstring."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # in messages: "unknown {kind} 'x'; choose one of ..."
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str, **info: Any) -> None:
        """Add backend `name`, found at `target` ("package.module:Attr" or "package.module"); nothing is imported.

        ValueError for a name already taken (two backends must never answer to one name) or a malformed target.
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered (as {self._entries[name].target})")
        module, sep, attr = target.partition(":")
        if not module or (sep and not attr):
            raise ValueError(f"{self.kind} {name!r}: target must be 'package.module' or 'package.module:Attr', "
                             f"got {target!r}")
        self._entries[name] = Entry(name, module, attr or None, MappingProxyType(dict(info)))

    def names(self, **where: Any) -> tuple[str, ...]:
        """Registered names, in registration order; with `where`, those whose data has each of those values."""
        return tuple(n for n, e in self._entries.items()
                     if all(k in e.info and e.info[k] == v for k, v in where.items()))

    def entry(self, name: str) -> Entry:
        """The registration of `name`; ValueError listing the choices when there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}") from None

    def load(self, name: str, attr: str | None = None) -> Any:
        """Import `name`'s module now and return its target (or its attribute `attr`).

        ValueError for an unknown name; BackendUnavailable, naming the missing module and the other choices,
        when the module cannot be imported. A backend whose package is only needed at construction checks it
        there, with its own message naming the package and the fallback.
        """
        e = self.entry(name)
        try:
            module = importlib.import_module(e.module)
        except ImportError as err:
            others = ", ".join(n for n in self._entries if n != name) or "none"
            raise BackendUnavailable(
                f"{self.kind} {name!r} cannot be used: importing {e.module} failed ({type(err).__name__}: {err}); "
                f"install what it needs or choose another {self.kind} ({others})") from err
        attr = attr or e.attr
        return getattr(module, attr) if attr else module

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
