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
ever goes into an error message. Stripe's ``Stripe-Signature`` is the same
scheme, and `adapters.billing.signature` checks it with `verify` too: one
parser, strict about what it takes (ASCII digits for ``t``, 64 lowercase hex
digits for a ``v1`` that can match, at most 64 entries).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

from broker.errors import SignatureInvalid

__all__ = ["HEADER", "DEFAULT_TOLERANCE_S", "mac", "sign", "verify"]

HEADER = "X-Q2C-Signature"
DEFAULT_TOLERANCE_S = 300.0

#: More entries than any rotation needs: refused before any work is done.
_MAX_ITEMS = 64
#: ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Compared in place of a malformed candidate, so every pair costs the same.
_NO_MATCH = b"-" * 64


def mac(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>." + body`` keyed with *secret*."""
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The header value for *body*: one ``v1`` per secret, in order.

    Raises:
        ValueError: no secret given.
    """
    if not secrets:
        raise ValueError("signing needs at least one secret")
    macs = ",".join(f"v1={mac(s, timestamp, body)}" for s in secrets)
    return f"t={timestamp},{macs}"


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    name: str = HEADER,
) -> int:
    """Accept *body* if one ``v1`` matches one of *secrets* and ``t`` is recent.

    The one check of the ``t=…,v1=…`` scheme, for ``X-Q2C-Signature`` and,
    with *name* ``Stripe-Signature``, for Stripe's webhooks. Anything that
    is not exactly that scheme is refused as `SignatureInvalid`, never an
    other exception: a header is the sender's to get wrong.

    Returns:
        The signed timestamp.

    Raises:
        SignatureInvalid: the header is missing or malformed, ``t`` is more
            than *tolerance_s* from *now*, or no signature matches.
        ValueError: no secret, or an empty one (a configuration error).
    """
    if not secrets or not all(secrets):
        raise ValueError(f"{name}: no secret, or an empty one, is configured")
    timestamp, candidates = _parse(header, name)
    age_s = now - timestamp
    if abs(age_s) > tolerance_s:
        when = f"{age_s:.0f} s old" if age_s > 0 else f"{-age_s:.0f} s in the future"
        raise SignatureInvalid(
            f"{name} timestamp is {when} (tolerance {tolerance_s:g} s); "
            "replayed or clock skew"
        )
    # Every pair is compared, so the time taken does not tell which secret
    # or which candidate came close. A candidate that is not 64 lowercase hex
    # digits cannot match and is compared as a placeholder of the same size.
    matched = False
    for secret in secrets:
        expected = mac(secret, timestamp, body).encode("ascii")
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate or _NO_MATCH)
    if not matched:
        raise SignatureInvalid(
            f"{name} does not match the body: no v1 signature matches any "
            f"configured secret ({len(candidates)} v1, {len(secrets)} secrets)"
        )
    return timestamp


def _parse(header: str | None, name: str) -> tuple[int, list[bytes]]:
    """``t`` and the ``v1`` values (b"" for one that is not hex SHA-256).

    The messages never quote the header: it is the sender's, and a log line
    or an answer that echoes it would hand a forged value back to whoever
    reads them.
    """
    if header is None or not header.strip():
        raise SignatureInvalid(f"{name} header is missing")
    items = header.split(",")
    if len(items) > _MAX_ITEMS:
        raise SignatureInvalid(
            f"{name} header is malformed: more than {_MAX_ITEMS} entries"
        )
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in items:
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureInvalid(f"{name} header is malformed: not key=value pairs")
        if key == "t":
            if timestamp is not None:
                raise SignatureInvalid(f"{name} header is malformed: more than one t=")
            if not _UNIX_SECONDS.fullmatch(value):
                raise SignatureInvalid(
                    f"{name} header is malformed: t= is not unix seconds"
                )
            timestamp = int(value)
        elif key == "v1":
            hexdigest = _HEX_SHA256.fullmatch(value)
            candidates.append(value.encode("ascii") if hexdigest else b"")
    if timestamp is None:
        raise SignatureInvalid(f"{name} header lacks a timestamp: no t=")
    if not candidates:
        raise SignatureInvalid(
            f"{name} header lacks a signature: no v1= (other schemes are ignored)"
        )
    return timestamp, candidates
