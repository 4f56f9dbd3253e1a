"""``X-Q2C-Signature``: how pushes from systems that sign nothing are authenticated.

Salesforce signs nothing it delivers (CometD and Pub/Sub are pulls over an
authenticated session) and SAP Event Mesh authenticates webhook deliveries
with OAuth or basic credentials, not a payload signature. So the change
events of the one and the business events of the other reach ``POST
/webhooks/<system>`` through a relay (or an Event Mesh subscription) that
signs each body the way Stripe signs webhooks::

    X-Q2C-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>

During a secret rotation the sender signs with both secrets (two ``v1``
entries) and the receiver accepts any of its own active secrets. The
receiver checks the raw bytes before parsing, compares every pair in
constant time and refuses timestamps more than the tolerance away from now,
in either direction (which bounds replays). Neither the header nor a secret
ever goes into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from broker.errors import SignatureInvalid

__all__ = ["HEADER", "DEFAULT_TOLERANCE_S", "sign", "verify"]

HEADER = "X-Q2C-Signature"
DEFAULT_TOLERANCE_S = 300.0


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The header value for *body*: one ``v1`` per secret, in order.

    Raises:
        ValueError: no secret given.
    """
    if not secrets:
        raise ValueError("signing needs at least one secret")
    macs = ",".join(f"v1={_mac(s, timestamp, body)}" for s in secrets)
    return f"t={timestamp},{macs}"


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> None:
    """Accept *body* if one ``v1`` matches one of *secrets* and ``t`` is recent.

    Raises:
        SignatureInvalid: the header is missing or malformed, ``t`` is more
            than *tolerance_s* from *now*, or no signature matches.
    """
    if not header:
        raise SignatureInvalid(f"{HEADER} header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureInvalid(f"{HEADER} header is malformed: not key=value pairs")
        if key == "t":
            if not value.isdigit():
                raise SignatureInvalid(
                    f"{HEADER} header is malformed: t= is not an integer"
                )
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None:
        raise SignatureInvalid(f"{HEADER} header lacks a timestamp: no t=")
    if not candidates:
        raise SignatureInvalid(f"{HEADER} header lacks a signature: no v1=")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid(
            f"{HEADER} timestamp is {now - timestamp:.0f} s from now "
            f"(tolerance {tolerance_s:g} s); replayed or clock skew"
        )
    # Every pair is compared, so the time taken does not tell which secret
    # or which candidate came close.
    matched = False
    for secret in secrets:
        expected = _mac(secret, timestamp, body)
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureInvalid(
            f"{HEADER} does not match the body: none of the configured secrets "
            "signed it"
        )
