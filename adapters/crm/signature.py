"""``X-Q2C-Signature``: the signature the broker's Salesforce relay puts on pushes.

Salesforce signs nothing it delivers (CometD and Pub/Sub are pulls over an
authenticated session), so change events pushed to ``POST /webhooks/<system>``
come through a relay that signs them the way Stripe signs webhooks::

    X-Q2C-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>

During a secret rotation the relay signs with both secrets (two ``v1``
entries) and the receiver accepts any of its own active secrets. The
receiver checks the raw bytes before parsing, compares in constant time and
refuses timestamps more than the tolerance away from now, in either
direction. Neither the header nor a secret ever goes into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from broker.errors import SignatureInvalid

__all__ = ["HEADER", "DEFAULT_TOLERANCE_S", "sign", "verify"]

HEADER = "X-Q2C-Signature"
DEFAULT_TOLERANCE_S = 300.0


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The header value for *body*: one ``v1`` per secret, in order."""
    if not secrets:
        raise ValueError("at least one signing secret is needed")
    parts = [f"t={timestamp}", *(f"v1={_digest(s, timestamp, body)}" for s in secrets)]
    return ",".join(parts)


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
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureInvalid(f"{HEADER} header is malformed")
        if key == "t":
            if not value.isdigit():
                raise SignatureInvalid(f"{HEADER} timestamp is malformed")
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureInvalid(f"{HEADER} header lacks t= or v1=")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid(
            f"{HEADER} timestamp is {now - timestamp:.0f} s from now "
            f"(tolerance {tolerance_s:.0f} s)"
        )
    expected = [_digest(s, timestamp, body).encode() for s in secrets]
    # Compare every pair, so the time taken does not depend on which matched.
    matched = False
    for candidate in candidates:
        for digest in expected:
            matched |= hmac.compare_digest(candidate.encode(), digest)
    if not matched:
        raise SignatureInvalid(f"{HEADER} does not match the body")
