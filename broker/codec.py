"""Wire bytes ⇄ envelopes and events, with reused msgspec codecs.

Everything that reads untrusted bytes goes through `decode_envelope` and
`Decoders.decode_data`, which turn every way a message can be bad into one of
four `PermanentError` leaves, each with the reason stored on the dead letter:
``oversize`` (never decoded), ``malformed`` (not JSON, not UTF-8, duplicate
keys, absurd nesting or numbers, not an envelope), ``unknown_type`` and
``schema_invalid``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn

import msgspec

from broker.errors import (
    MessageTooLarge,
    SchemaInvalid,
    UndecodableMessage,
    UnknownMessageType,
)
from broker.transport import SHORTSTR_MAX_BYTES, fits_shortstr
from canonical.envelope import Envelope
from canonical.upcast import current_version, upcast

__all__ = [
    "Decoders",
    "JSON_CONTENT_TYPES",
    "check_json",
    "decode_envelope",
    "encode_envelope",
    "encode_event",
    "utcnow",
]

_envelope_decoder = msgspec.json.Decoder(Envelope)
# Untyped, for upcasting: JSON numbers with a fraction stay exact Decimals
# (a float would turn 1.10 into 1.1 and lose digits past the 15th or so).
_plain_decoder = msgspec.json.Decoder(float_hook=Decimal)
_encoder = msgspec.json.Encoder(decimal_format="string")
_MAX_NUMBER_CHARS = 64

# W3C Trace Context: version-traceid-parentid-flags in lower-case hex, then
# the end of the value (version 00) or "-" and more fields (a later version).
# Version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-|\Z)"
)
_TRACEPARENT_CHARS = 55


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise UndecodableMessage(f"duplicate JSON key {key!r}")
        seen.add(key)


def _check_number(text: str) -> None:
    if len(text) > _MAX_NUMBER_CHARS:
        raise UndecodableMessage(f"JSON number of {len(text)} characters")


def _reject_constant(name: str) -> NoReturn:
    raise UndecodableMessage(f"JSON constant {name} is not allowed")


# One decoder, reused: json.loads with hooks builds a new one per call.
_strict_json = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates,
    parse_int=_check_number,
    parse_float=_check_number,
    parse_constant=_reject_constant,
)


def check_json(body: bytes) -> None:
    """Refuse JSON that msgspec would accept but that is ambiguous or hostile.

    msgspec keeps the last of duplicate keys silently and reads numbers of
    any length; a second parser could read the same bytes differently, so
    such documents are malformed here. The C scanner of the standard
    library does this in a few microseconds for a typical envelope.

    Raises:
        UndecodableMessage: duplicate keys, huge numbers, NaN/Infinity,
            nesting too deep, or not JSON at all.
    """
    try:
        _strict_json.decode(body.decode("utf-8"))
    except UndecodableMessage:
        raise
    except RecursionError as exc:
        raise UndecodableMessage("JSON nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UndecodableMessage(f"not JSON: {exc}") from exc


def _traceparent(value: str) -> str | None:
    """*value* if it is a valid W3C ``traceparent``, else None (ignored, per spec).

    A later version is read by its first four fields and kept as version
    ``00`` with those fields, the way a version-00 participant propagates it.
    """
    if _TRACEPARENT.match(value) is None:
        return None
    if value[:2] == "00":
        return value if len(value) == _TRACEPARENT_CHARS else None
    return "00" + value[2:_TRACEPARENT_CHARS]


#: Content types an envelope may be sent with (absent is accepted too).
JSON_CONTENT_TYPES = frozenset({"application/cloudevents+json", "application/json"})


def decode_envelope(
    body: bytes, *, max_bytes: int, content_type: str | None = None
) -> Envelope:
    """Decode and check one envelope.

    Raises:
        MessageTooLarge: *body* is over *max_bytes* (checked before any parsing).
        UndecodableMessage: not a well-formed envelope, declared as
            something other than JSON, with an ``id``, ``type`` or
            ``correlationid`` too long for an AMQP short string, with a
            NUL character in an attribute, or a ``time`` whose UTC instant
            is outside the years 1 to 9999.

    The returned envelope's ``time`` is in UTC, so its ``date()`` (the
    inbox key's day) is the same for the same instant whatever offset it
    was sent with. An invalid ``traceparent`` is dropped, not refused: W3C
    Trace Context says to ignore it and start a new trace.
    """
    if len(body) > max_bytes:
        raise MessageTooLarge(f"{len(body)} bytes is over the {max_bytes}-byte limit")
    if content_type is not None:
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type not in JSON_CONTENT_TYPES:
            raise UndecodableMessage(
                f"content type {content_type[:100]!r} is not a JSON CloudEvent"
            )
    check_json(body)
    try:
        env = _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise UndecodableMessage(f"not a canonical envelope: {exc}") from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UndecodableMessage(f"not JSON: {exc}") from exc
    # These travel as AMQP short strings (message id, type, correlation id)
    # on what the message causes: one too long would fail every publish of
    # its outputs, so it is refused here, where its bytes can be kept.
    for name, value in (
        ("id", env.id),
        ("type", env.type),
        ("correlationid", env.correlation_id),
    ):
        if not fits_shortstr(value):
            raise UndecodableMessage(
                f"envelope {name} is over {SHORTSTR_MAX_BYTES} bytes "
                "(an AMQP short string)"
            )
    # Attributes become text columns (inbox keys, journal, dead letters),
    # and PostgreSQL's text cannot hold NUL: one such message would fail
    # the write of every batch it came in, again at each redelivery.
    for name, text in (
        ("id", env.id),
        ("source", env.source),
        ("type", env.type),
        ("subject", env.subject),
        ("correlationid", env.correlation_id),
        ("causationid", env.causation_id),
        ("idempotencykey", env.idempotency_key),
        ("traceparent", env.traceparent),
    ):
        if text is not None and "\x00" in text:
            raise UndecodableMessage(f"envelope {name} contains a NUL character")
    return _normalised(env)


def _normalised(env: Envelope) -> Envelope:
    """*env* with ``time`` in UTC and an invalid ``traceparent`` dropped.

    The usual envelope (written by us: UTC, a valid or no traceparent) costs
    an identity test and a regex match, and is returned as is.
    """
    time = env.time
    traceparent = env.traceparent
    if time.tzinfo is not UTC:
        try:
            time = time.astimezone(UTC)
        except OverflowError as exc:
            raise UndecodableMessage(
                f"envelope time {env.time.isoformat()} is out of range in UTC"
            ) from exc
    if traceparent is not None:
        traceparent = _traceparent(traceparent)
    if time is env.time and traceparent is env.traceparent:
        return env
    return msgspec.structs.replace(env, time=time, traceparent=traceparent)


class Decoders:
    """One reused decoder per event type a consumer understands.

    The current schema version of a type is looked up per message, so an
    upcaster registered after the decoders were built still applies.
    """

    def __init__(self, types: Mapping[str, type[Any]]) -> None:
        self._types = dict(types)
        self._decoders = {tag: msgspec.json.Decoder(t) for tag, t in types.items()}

    def __contains__(self, event_type: str) -> bool:
        return event_type in self._decoders

    def decode_data(self, envelope: Envelope) -> Any:
        """Decode the envelope's data as its declared type.

        Raises:
            UnknownMessageType: no decoder for ``envelope.type``.
            SchemaInvalid: the data does not match the type's schema, its
                schema version is not readable here, or its upcaster failed.
        """
        decoder = self._decoders.get(envelope.type)
        if decoder is None:
            raise UnknownMessageType(f"no handler for type {envelope.type!r}")
        try:
            if envelope.schema_version != current_version(envelope.type):
                return self._upcast(envelope)
            return decoder.decode(envelope.data)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise SchemaInvalid(f"{envelope.type}: {exc}") from exc
        except (msgspec.DecodeError, RecursionError) as exc:
            raise SchemaInvalid(f"{envelope.type}: {exc}") from exc
        except ArithmeticError as exc:
            # A type's own check that computes, e.g. abs() of 1E+1000000
            # (decimal.Overflow): the message is bad, the consumer is fine.
            raise SchemaInvalid(
                f"{envelope.type}: {type(exc).__name__} in a check of its data"
            ) from exc

    def _upcast(self, envelope: Envelope) -> Any:
        """An older schema version: upcast the plain value, then convert it."""
        data = _plain_decoder.decode(envelope.data)
        if not isinstance(data, dict):
            raise TypeError("event data is not a JSON object")
        try:
            data = upcast(envelope.type, envelope.schema_version, data)
        except Exception as exc:  # an upcaster's bug is this message's: dead-letter it
            raise SchemaInvalid(
                f"{envelope.type} v{envelope.schema_version}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return msgspec.convert(data, self._types[envelope.type])


def encode_event(event: Any) -> msgspec.Raw:
    """Encode an event Struct as raw JSON for an envelope's ``data``."""
    return msgspec.Raw(_encoder.encode(event))


def encode_envelope(envelope: Envelope) -> bytes:
    """Encode an envelope (structured-mode CloudEvent) to JSON bytes."""
    return _encoder.encode(envelope)
