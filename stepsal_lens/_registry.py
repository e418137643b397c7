"""A named registry with the package's error messages (formats, splitters, targets, models)."""

from __future__ import annotations

from typing import Generic, TypeVar

from stepsal_lens.errors import StepSalError

T = TypeVar("T")


class Registry(Generic[T]):
    """Items by name; ``get`` of an unknown name lists the options and how to add one."""

    def __init__(self, kind: str, how_to_add: str):
        self.kind = kind
        self.how_to_add = how_to_add
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, overwrite: bool = False) -> T:
        if name in self._items and not overwrite:
            raise StepSalError(f"{self.kind} {name!r} is already registered; pass overwrite=True")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise StepSalError(f"unknown {self.kind} {name!r}; choose one of {self.names()} "
                               f"or {self.how_to_add}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items
