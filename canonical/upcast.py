"""Reading old versions of an event: upcasters, applied before decoding.

An envelope says which version of its type's schema its ``data`` follows
(``schemaversion``). A reader that knows a newer version registers one
upcaster per step (v1 → v2, v2 → v3, …); `upcast` chains them on the plain
JSON value, so the typed decoder only ever sees the current shape. Adding a
field with a default needs no upcaster (tolerant readers); renaming or
restructuring does.

    @upcaster("cpq.quote.approved", 1)
    def _quote_v1(data: dict[str, Any]) -> dict[str, Any]:
        data["quote"]["tax_country"] = data["quote"].pop("country")
        return data
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Upcaster", "upcaster", "upcast", "current_version", "REGISTRY"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: (type tag, from version) → the step to from version + 1.
REGISTRY: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function as the step from *from_version* to the next version."""

    def register(fn: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in REGISTRY:
            raise ValueError(f"{event_type} v{from_version} has an upcaster already")
        REGISTRY[key] = fn
        return fn

    return register


def current_version(event_type: str) -> int:
    """The newest schema version of *event_type* this process can read."""
    version = 1
    while (event_type, version) in REGISTRY:
        version += 1
    return version


def upcast(event_type: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring *data* from *version* to the current version of *event_type*.

    Raises:
        ValueError: *version* is newer than this reader knows, or below 1.
    """
    current = current_version(event_type)
    if version < 1 or version > current:
        raise ValueError(
            f"{event_type} schema version {version} is not readable here "
            f"(current is {current})"
        )
    while version < current:
        data = REGISTRY[(event_type, version)](data)
        version += 1
    return data
