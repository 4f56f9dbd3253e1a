"""The X-Q2C-Signature scheme: HMAC-SHA256 over "<t>.<body>", rotation, tolerance."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from adapters import signing as signature
from broker.errors import SignatureInvalid

BODY = b'{"specversion":"1.0"}'
T = 1_700_000_000


def test_the_header_is_t_and_one_v1_per_secret() -> None:
    """``t=<unix>,v1=<hex>`` with the documented MAC, one v1 per secret."""
    header = signature.sign(["a", "b"], BODY, timestamp=T)
    expected = hmac.new(b"a", f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    parts = header.split(",")
    assert parts[0] == f"t={T}"
    assert parts[1] == f"v1={expected}"
    assert len(parts) == 3


def test_any_secret_matching_any_v1_verifies() -> None:
    """During rotation the receiver may hold the old or the new secret."""
    header = signature.sign(["old", "new"], BODY, timestamp=T)
    signature.verify(header, BODY, ["new"], now=T)
    signature.verify(header, BODY, ["other", "old"], now=T + 299)


@pytest.mark.parametrize(
    ("header", "now", "secrets", "reason"),
    [
        (None, T, ["s"], "missing"),
        ("v1=abc", T, ["s"], "no t="),
        (f"t={T}", T, ["s"], "no v1="),
        ("t=soon,v1=ab", T, ["s"], "is not unix seconds"),
        ("garbage", T, ["s"], "key=value"),
        (signature.sign(["s"], BODY, timestamp=T), T + 301, ["s"], "replayed"),
        (signature.sign(["s"], BODY, timestamp=T), T - 301, ["s"], "replayed"),
        (signature.sign(["s"], BODY, timestamp=T), T, ["t"], "does not match"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(
    header: str | None, now: float, secrets: list[str], reason: str
) -> None:
    """Missing, malformed, stale and wrong signatures each say which."""
    with pytest.raises(SignatureInvalid, match=reason):
        signature.verify(header, BODY, secrets, now=now)


def test_a_changed_body_does_not_verify() -> None:
    """The MAC covers the exact bytes."""
    header = signature.sign(["s"], BODY, timestamp=T)
    with pytest.raises(SignatureInvalid, match="does not match"):
        signature.verify(header, BODY + b" ", ["s"], now=T)


def test_signing_needs_a_secret() -> None:
    """No secret, no signature."""
    with pytest.raises(ValueError, match="secret"):
        signature.sign([], BODY, timestamp=T)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("t=\u00b2,v1=ab", "t= is not unix seconds"),  # a digit to isdigit, not to int
        ("t=\u0661\u0662,v1=ab", "t= is not unix seconds"),
        (f"t={T},v1=\u00e9", "does not match"),  # not ASCII: no TypeError
        (f"t={T},v1=\udcff", "does not match"),  # an undecodable header byte
        (f"t={T},v1={'AB' * 32}", "does not match"),  # hex, but not as signed
        (",".join([f"t={T}"] + ["v1=ab"] * 64), "more than 64 entries"),
    ],
    ids=["superscript", "arabic-indic", "non-ascii", "surrogate", "upper", "many"],
)
def test_hostile_headers_are_refused_as_invalid_signatures(
    header: str, reason: str
) -> None:
    """Whatever the header holds, the answer is SignatureInvalid, never a crash."""
    with pytest.raises(SignatureInvalid, match=reason):
        signature.verify(header, BODY, ["s"], now=T)


def test_an_empty_secret_is_a_configuration_error() -> None:
    """A body signed with the empty key must not pass: refused before any check."""
    header = signature.sign([""], BODY, timestamp=T)
    with pytest.raises(ValueError, match="empty"):
        signature.verify(header, BODY, ["new", ""], now=T)


def test_a_valid_signature_returns_its_timestamp() -> None:
    assert (
        signature.verify(signature.sign(["s"], BODY, timestamp=T), BODY, ["s"], now=T)
        == T
    )
