"""The canonical model's published types, pinned byte for byte by golden files.

A golden file changes only with a deliberate schema change (and then with an
upcaster for the old version). Regenerate after such a change with
``Q2C_WRITE_GOLDEN=1 pytest tests/contract/test_canonical.py``.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from broker.codec import Decoders, encode_event, utcnow
from broker.errors import SchemaInvalid
from canonical import Envelope, Money
from canonical.commerce import Account
from canonical.q2c import ALL_EVENTS, BusinessException, ExceptionKind, OrderBooked
from canonical.upcast import REGISTRY, current_version, upcast, upcaster
from tests.contract.canonical_samples import samples

GOLDEN = Path(__file__).parent / "golden" / "canonical"
SAMPLES = samples()
_encoder = msgspec.json.Encoder()


def _pretty(event: Any) -> bytes:
    return msgspec.json.format(_encoder.encode(event), indent=2) + b"\n"


def test_every_published_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(ALL_EVENTS)


@pytest.mark.parametrize("tag", sorted(ALL_EVENTS))
def test_golden_sample_round_trips(tag: str) -> None:
    path = GOLDEN / f"{tag}.json"
    encoded = _pretty(SAMPLES[tag])
    if os.environ.get("Q2C_WRITE_GOLDEN"):
        path.write_bytes(encoded)
    assert encoded == path.read_bytes(), f"{tag} changed shape: see {path}"
    decoded = msgspec.json.decode(path.read_bytes(), type=ALL_EVENTS[tag])
    assert decoded == SAMPLES[tag]


def test_business_exception_kinds_are_the_published_ones() -> None:
    """The kinds an operator's tooling may meet; each decodes from the wire.

    Adding one is a deliberate change of ``q2c.exception.raised``: readers
    of an older release refuse the new kinds.
    """
    kinds = get_args(ExceptionKind)
    assert kinds == (
        "quote_rejected",
        "quote_denied",
        "order_fallout",
        "booking_mismatch",
        "duplicate_booking",
        "invoice_mismatch",
    )
    golden = (GOLDEN / "q2c.exception.raised.json").read_bytes()
    for kind in kinds:
        raw = golden.replace(b'"quote_rejected"', f'"{kind}"'.encode(), 1)
        assert msgspec.json.decode(raw, type=BusinessException).kind == kind


def test_tags_follow_domain_entity_verb() -> None:
    for tag in ALL_EVENTS:
        domain, entity, verb = tag.split(".")
        assert domain in {"crm", "cpq", "erp", "billing", "q2c"}, tag
        assert entity, tag
        assert verb.endswith("ed") or verb in {"paid"}, tag


def test_money_refuses_floats_nan_and_unknown_currencies() -> None:
    with pytest.raises(msgspec.ValidationError, match="ISO 4217"):
        msgspec.json.decode(b'{"amount": "1.00", "currency": "XYZ"}', type=Money)
    with pytest.raises(msgspec.ValidationError, match="not finite"):
        msgspec.json.decode(b'{"amount": "NaN", "currency": "EUR"}', type=Money)
    with pytest.raises(msgspec.ValidationError, match="regex"):
        msgspec.json.decode(b'{"amount": "1", "currency": "eur"}', type=Money)
    assert Money(amount=Decimal("1.005"), currency="EUR").quantized().amount == Decimal(
        "1.00"
    )
    assert Money(amount=Decimal("1.5"), currency="JPY").quantized().amount == Decimal(2)


def test_country_codes_are_iso_3166() -> None:
    raw = msgspec.json.encode(SAMPLES["crm.account.changed"].account)
    with pytest.raises(msgspec.ValidationError, match="ISO 3166"):
        msgspec.json.decode(raw.replace(b'"DE"', b'"XX"', 1), type=Account)


def test_tolerant_reader_ignores_fields_from_newer_writers() -> None:
    raw = _encoder.encode(SAMPLES["erp.order.booked"])
    newer = raw[:-1] + b',"delivery_block":"Z1"}'
    assert msgspec.json.decode(newer, type=OrderBooked) == SAMPLES["erp.order.booked"]


def _envelope(tag: str, data: bytes, version: int) -> Envelope:
    return Envelope(
        id="m-1",
        source="/test",
        type=tag,
        time=utcnow(),
        correlation_id="deal-x",
        idempotency_key="k",
        schema_version=version,
        data=msgspec.Raw(data),
    )


def test_upcaster_brings_an_old_version_to_the_current_shape() -> None:
    tag = "erp.order.booked"
    current = _encoder.encode(SAMPLES[tag])
    # v1 of this sample spelled the ERP's number "sap_order"; v2 renamed it.
    old = current.replace(b'"erp_order_id"', b'"sap_order"')

    @upcaster(tag, 1)
    def _rename(data: dict[str, Any]) -> dict[str, Any]:
        data["erp_order_id"] = data.pop("sap_order")
        return data

    try:
        assert current_version(tag) == 2
        decoders = Decoders({tag: OrderBooked})
        assert decoders.decode_data(_envelope(tag, old, 1)) == SAMPLES[tag]
        assert decoders.decode_data(_envelope(tag, current, 2)) == SAMPLES[tag]
        with pytest.raises(SchemaInvalid, match="version 3"):
            decoders.decode_data(_envelope(tag, current, 3))
    finally:
        del REGISTRY[(tag, 1)]
    with pytest.raises(ValueError, match="not readable"):
        upcast(tag, 0, {})


def test_event_data_carries_its_type_tag() -> None:
    for tag, sample in SAMPLES.items():
        assert msgspec.json.decode(encode_event(sample))["type"] == tag


def test_facts_name_the_instance_they_belong_to() -> None:
    deal = "deal-006Hn00000A1b2cIAB"
    assert SAMPLES["crm.opportunity.created"].correlation() == deal
    assert SAMPLES["cpq.quote.approved"].correlation() == deal
    assert SAMPLES["cpq.quote.denied"].correlation() == deal
    assert SAMPLES["crm.account.changed"].correlation() == "acct-001Hn00000XyZ12IAF"
    assert SAMPLES["erp.customer.synced"].correlation() == "acct-001Hn00000XyZ12IAF"
    assert SAMPLES["erp.product.changed"].correlation() == "SAAS-FLEET-PRO"
    assert SAMPLES["erp.order.booked"].correlation() is None  # the command's
