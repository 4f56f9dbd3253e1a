"""The ``X-Q2C-Signature`` scheme for business events pushed to our webhook.

SAP Event Mesh delivers S/4HANA business events to a webhook subscription;
the broker's subscription is configured to sign each delivery with a shared
secret, and the sandbox signs the same way. The header reads

    X-Q2C-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

with one ``v1`` per active secret while a secret is being rotated. A
delivery is genuine when any ``v1`` matches any secret the receiver holds,
compared in constant time, and ``t`` lies within the tolerance of the
receiver's clock (300 s by default), which bounds replays.
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
    """The header value for *body*, with one ``v1`` per secret.

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
    """Check *header* over the raw *body*.

    Raises:
        SignatureInvalid: the header is missing or malformed, its timestamp is
            outside *tolerance_s* of *now*, or no ``v1`` matches any secret.
    """
    if not header:
        raise SignatureInvalid(f"{HEADER} header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureInvalid(f"{HEADER}: {part.strip()!r} is not key=value")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureInvalid(
                    f"{HEADER}: t={value!r} is not an integer"
                ) from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None:
        raise SignatureInvalid(f"{HEADER} has no t= timestamp")
    if not candidates:
        raise SignatureInvalid(f"{HEADER} has no v1= signature")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid(
            f"{HEADER} timestamp {timestamp} is more than {tolerance_s:g} s "
            f"from now ({now:.0f}); replayed or clock skew"
        )
    # Every pair is compared, so the time taken does not tell which secret
    # or which candidate came close.
    matched = False
    for secret in secrets:
        expected = _mac(secret, timestamp, body)
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureInvalid(f"{HEADER} matches none of the configured secrets")
