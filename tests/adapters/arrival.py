"""The inbox key a webhook event claims when the ingress publishes it at a given moment.

The inbox that applies each fact once is keyed by the idempotency key and
the day of the envelope's ``time``; the ingress stamps the arrival time when
`broker.connector.Inbound.time` is unset. `inbox_key_on_arrival` builds the
envelope the way the ingress does, with the ingress's clock set to *at*.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

import pytest

from broker.codec import decode_envelope
from broker.connector import Inbound
from broker.http import ingress
from broker.system_commit import inbox_key

__all__ = ["inbox_key_on_arrival"]


def inbox_key_on_arrival(
    monkeypatch: pytest.MonkeyPatch, at: datetime, parse: Callable[[], Inbound]
) -> tuple[str, date]:
    """Parse and publish with the clock at *at*: the inbox key and day claimed."""
    monkeypatch.setattr(ingress, "utcnow", lambda: at)
    message = ingress.inbound_message(parse())
    key = inbox_key(decode_envelope(message.body, max_bytes=1 << 20))
    return key.key, key.day
