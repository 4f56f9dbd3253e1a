"""Stripe-Signature: HMAC over ``t.body``, tolerance, rotation, v1 only.

Vectors are computed from the published algorithm (Stripe publishes no
vector), cross-checked here against an independent HMAC computation.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from adapters.billing.signature import compute_signature, sign, verify
from broker.errors import SignatureInvalid

BODY = b'{"id": "evt_1", "object": "event", "type": "invoice.paid"}'
SECRET = "whsec_current"
OLD = "whsec_old"
T = 1_700_000_000


def test_signature_is_hex_hmac_sha256_of_timestamp_dot_body() -> None:
    """The signed payload is ``<t>.<raw body>``, keyed with the secret."""
    expected = hmac.new(
        SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256
    ).hexdigest()
    assert compute_signature(BODY, SECRET, T) == expected
    assert sign(BODY, SECRET, T) == f"t={T},v1={expected}"


def test_a_valid_signature_verifies_and_returns_its_timestamp() -> None:
    """The header Stripe would send is accepted."""
    assert verify(BODY, sign(BODY, SECRET, T), [SECRET], now=T + 5) == T


def test_a_tampered_body_is_refused() -> None:
    """One changed byte in the body breaks the signature."""
    header = sign(BODY, SECRET, T)
    with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
        verify(BODY.replace(b"paid", b"void"), header, [SECRET], now=T)


def test_a_wrong_secret_is_refused() -> None:
    """A signature made with another endpoint's secret does not match."""
    with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
        verify(BODY, sign(BODY, "whsec_other", T), [SECRET], now=T)


def test_a_tampered_timestamp_is_refused() -> None:
    """The timestamp is signed too: moving it breaks the signature."""
    header = sign(BODY, SECRET, T).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
        verify(BODY, header, [SECRET], now=T)


def test_a_stale_timestamp_is_refused() -> None:
    """Older than the tolerance: refused even though the HMAC matches."""
    header = sign(BODY, SECRET, T)
    assert verify(BODY, header, [SECRET], now=T + 300) == T
    with pytest.raises(SignatureInvalid, match=r"301 s old \(tolerance 300 s\)"):
        verify(BODY, header, [SECRET], now=T + 301)


def test_a_future_timestamp_beyond_tolerance_is_refused() -> None:
    """Stamped too far ahead of our clock: refused."""
    header = sign(BODY, SECRET, T)
    assert verify(BODY, header, [SECRET], now=T - 300) == T
    with pytest.raises(SignatureInvalid, match="301 s in the future"):
        verify(BODY, header, [SECRET], now=T - 301)


def test_tolerance_is_configurable() -> None:
    """A tighter tolerance refuses what the default accepts."""
    header = sign(BODY, SECRET, T)
    with pytest.raises(SignatureInvalid, match="tolerance 10 s"):
        verify(BODY, header, [SECRET], now=T + 60, tolerance_s=10)


def test_rotation_signs_with_every_active_secret() -> None:
    """During a rotation the header carries one v1 per secret."""
    header = sign(BODY, SECRET, T, extra_secrets=[OLD])
    assert header.count("v1=") == 2
    # A receiver configured with the old, the new, or both, accepts it.
    for configured in ([OLD], [SECRET], [SECRET, OLD]):
        assert verify(BODY, header, configured, now=T) == T


def test_receiver_in_rotation_accepts_either_secret() -> None:
    """Configured with old and new, a header signed by either one verifies."""
    for signer in (OLD, SECRET):
        assert verify(BODY, sign(BODY, signer, T), [SECRET, OLD], now=T) == T
    with pytest.raises(SignatureInvalid, match="2 secrets"):
        verify(BODY, sign(BODY, "whsec_retired", T), [SECRET, OLD], now=T)


def test_a_header_without_v1_is_refused_even_with_v0() -> None:
    """v0 (and any other scheme) is ignored; no v1 means no signature."""
    v0 = compute_signature(BODY, SECRET, T)
    with pytest.raises(SignatureInvalid, match="lacks a signature: no v1="):
        verify(BODY, f"t={T},v0={v0}", [SECRET], now=T)


def test_unknown_schemes_beside_v1_are_ignored() -> None:
    """Extra entries do not spoil a matching v1."""
    header = f"{sign(BODY, SECRET, T)},v0=deadbeef,scheme2=x"
    assert verify(BODY, header, [SECRET], now=T) == T


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "header is missing"),
        ("", "header is missing"),
        ("v1=abc", "lacks a timestamp: no t="),
        ("t=abc,v1=abc", "is not unix seconds"),
        ("t=-5,v1=abc", "is not unix seconds"),
        (f"t={T},t={T},v1=abc", "more than one t="),
        (f"t={T},garbage", "not key=value pairs"),
        (",".join(["v1=a"] * 70), "more than 64 entries"),
    ],
)
def test_malformed_headers_are_refused_with_the_reason(
    header: str | None, reason: str
) -> None:
    """Each way a header can be malformed is named."""
    with pytest.raises(SignatureInvalid, match=reason):
        verify(BODY, header, [SECRET], now=T)


def test_non_ascii_signatures_do_not_crash_the_comparison() -> None:
    """A junk v1 is a mismatch, not a TypeError."""
    with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
        verify(BODY, f"t={T},v1=\u00e9\u00e9", [SECRET], now=T)


def test_a_replayed_request_verifies_again_within_tolerance() -> None:
    """Signature checks do not dedupe: the same event id is accepted twice.

    A replay inside the tolerance window is indistinguishable from Stripe's
    own redelivery; dropping the duplicate is the job of the dedupe on
    ``event.id`` downstream of the ingress.
    """
    header = sign(BODY, SECRET, T)
    assert verify(BODY, header, [SECRET], now=T + 1) == T
    assert verify(BODY, header, [SECRET], now=T + 2) == T


def test_no_configured_secret_is_a_configuration_error() -> None:
    """Verifying with no secret at all is a setup mistake, not a bad request."""
    with pytest.raises(ValueError, match="no Stripe endpoint secret"):
        verify(BODY, sign(BODY, SECRET, T), [], now=T)
    with pytest.raises(ValueError, match="empty one"):
        verify(BODY, sign(BODY, "", T), [SECRET, ""], now=T)


@pytest.mark.parametrize(
    "header",
    [f"t={T},v1=\udcff", "t=\u00b2,v1=ab", f"t={T},v1=\u00e9"],
    ids=["surrogate", "superscript", "non-ascii"],
)
def test_undecodable_and_non_ascii_headers_are_invalid_signatures(header: str) -> None:
    """Undecodable header bytes arrive as surrogates: refused, not a crash."""
    with pytest.raises(SignatureInvalid):
        verify(BODY, header, [SECRET], now=T)
