"""A registry of classes by name: the one mechanism behind compressors and calibrators."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of ``base`` registered under their ``name`` attribute and built from a name and options.

    ``kind`` names the things in messages; ``listing`` introduces the names in the unknown-name error, and
    ``hint`` follows them.
    """

    def __init__(self, kind: str, base: type[T], listing: str = "registered", hint: str = "") -> None:
        self.kind, self.base, self.listing, self.hint = kind, base, listing, hint
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` available to :meth:`get` under ``cls.name``."""
        if cls.name in self._classes:
            raise ValueError(f"a {self.kind} named {cls.name!r} is already registered")
        self._classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str | T, **options: object) -> T:
        """The class registered as ``name`` built with ``options`` (an instance of ``base`` is returned as is)."""
        if isinstance(name, self.base):
            if options:
                raise ValueError(f"options are for {self.kind} names; this is already an instance")
            return name
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; {self.listing}: {', '.join(self.names())}{self.hint}")
        try:
            return self._classes[name](**options)
        except TypeError as exc:
            raise TypeError(f"bad options for {self.kind} {name!r}: {exc}") from None
