"""Content hashes: how a writer recognises its own write when it comes back."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = ["content_hash"]

_encoder = msgspec.json.Encoder(order="sorted")


def content_hash(value: Any) -> str:
    """A short, stable hash of *value*'s canonical JSON (keys sorted)."""
    return hashlib.blake2b(_encoder.encode(value), digest_size=12).hexdigest()
