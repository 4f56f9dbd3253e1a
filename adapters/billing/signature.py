"""Stripe webhook signatures: the ``Stripe-Signature`` header.

The header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>…]``; other schemes
(``v0=``, test-mode leftovers) may appear and are ignored. Each ``v1`` is the
hex HMAC-SHA256 of ``"<t>." + raw body`` keyed with an endpoint secret
(``whsec_…``). While a secret is being rotated Stripe signs with every active
secret, so the header carries several ``v1``; we accept the body if any of
them matches any of our configured secrets, comparing in constant time.

The timestamp is covered by the signature, so a replayed request cannot
carry a fresh one: requests older than the tolerance are refused, and so are
those stamped further in the future than the tolerance (a clock that far
ahead is a misconfiguration worth hearing about). Inside the tolerance a
replayed request verifies again: dropping the duplicate is the job of the
dedupe on ``event.id`` downstream, not of the signature.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters import signing

__all__ = ["HEADER", "DEFAULT_TOLERANCE_S", "sign", "verify", "compute_signature"]

#: Name of the header Stripe signs webhooks in.
HEADER = "Stripe-Signature"
#: Stripe's own libraries allow five minutes.
DEFAULT_TOLERANCE_S = 300.0

_SCHEME = "v1"


def compute_signature(payload: bytes, secret: str, t: int) -> str:
    """Hex HMAC-SHA256 of ``"<t>." + payload`` keyed with *secret*."""
    return signing.mac(secret, t, payload)


def sign(
    payload: bytes, secret: str, t: int, *, extra_secrets: Sequence[str] = ()
) -> str:
    """The ``Stripe-Signature`` value for *payload* sent at unix time *t*.

    Args:
        payload: the exact request body.
        secret: the endpoint secret.
        t: the timestamp to sign, unix seconds.
        extra_secrets: further active secrets during a rotation; each adds
            one more ``v1`` entry.
    """
    parts = [f"t={t}"]
    parts.extend(
        f"{_SCHEME}={compute_signature(payload, s, t)}"
        for s in (secret, *extra_secrets)
    )
    return ",".join(parts)


def verify(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> int:
    """Check *header* against the raw *payload*; return the signed timestamp.

    Stripe's scheme is the one `adapters.signing` checks for
    ``X-Q2C-Signature``, under another header name.

    Args:
        payload: the raw request body, byte for byte as received.
        header: the ``Stripe-Signature`` value (None when absent).
        secrets: every endpoint secret currently configured (old and new
            during a rotation); any of them may match.
        now: the current unix time.
        tolerance_s: how far the timestamp may be from *now*, either way.

    Raises:
        SignatureInvalid: the header is missing or malformed, has no ``v1``
            entry, no ``v1`` matches any secret, or the timestamp is outside
            the tolerance. The message says which.
        ValueError: *secrets* is empty or holds an empty secret (a
            configuration error, not a bad request).
    """
    if not secrets or not all(secrets):
        raise ValueError("no Stripe endpoint secret is configured (or an empty one)")
    return signing.verify(
        header, payload, secrets, now=now, tolerance_s=tolerance_s, name=HEADER
    )
