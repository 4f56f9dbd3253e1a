"""The CloudEvents JSON event format and JSON batch format, read side.

Media types ``application/cloudevents+json`` (one event, structured content
mode) and ``application/cloudevents-batch+json`` (an array of them). Members
are decoded one at a time from `msgspec.Raw`, so ``data`` keeps the exact JSON
text it was sent with and a bad member of a batch spoils only itself.

Each event must also pass `broker.codec.check_json`, as an envelope on the
AMQP side must: msgspec reads ``{"id": "A", "id": "B"}`` as event B where
another reader sees A, so duplicate names (and the other ambiguities it
refuses) make the event invalid here too.
"""

from __future__ import annotations

import base64

import msgspec

from adapters.cloudevents.views import (
    AttributeValue,
    CloudEventView,
    MemberError,
    from_attributes,
    is_json_media_type,
)
from broker.codec import check_json
from broker.errors import SchemaInvalid, UndecodableMessage

__all__ = ["parse_structured", "parse_batch", "BATCH_CONTENT_TYPE", "CONTENT_TYPE"]

#: Media type of one event in the JSON format (structured content mode).
CONTENT_TYPE = "application/cloudevents+json"
#: Media type of the JSON batch format.
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"

_Members = dict[str, msgspec.Raw]
_object_decoder = msgspec.json.Decoder(_Members)
_array_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_attribute_decoder = msgspec.json.Decoder(str | int | bool | None)
_base64_decoder: msgspec.json.Decoder[str | None] = msgspec.json.Decoder(str | None)


def parse_structured(body: bytes) -> CloudEventView:
    """Read one event in the JSON format.

    Raises:
        SchemaInvalid: the body is not a JSON object (or is nested deeper
            than the JSON decoder goes), is ambiguous JSON (a name twice, a
            huge number), or is not a valid CloudEvent (the message names
            the attribute at fault).
    """
    try:
        members = _object_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise SchemaInvalid(f"CloudEvent is not a JSON object: {exc}") from exc
    _check_unambiguous(body)
    return _event(members)


def parse_batch(body: bytes) -> list[CloudEventView | MemberError]:
    """Read a JSON batch: one result per member, in order.

    A member that is not a valid CloudEvent becomes a `MemberError` naming
    its index and reason; the other members are unaffected. An empty array
    is a valid, empty batch.

    Raises:
        SchemaInvalid: the body as a whole is not a JSON array, or is nested
            deeper than the JSON decoder goes.
    """
    try:
        raw_members = _array_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise SchemaInvalid(f"CloudEvents batch is not a JSON array: {exc}") from exc
    results: list[CloudEventView | MemberError] = []
    for index, raw in enumerate(raw_members):
        try:
            members = _object_decoder.decode(raw)
        except (msgspec.ValidationError, RecursionError):
            results.append(
                MemberError(index=index, id=None, reason="member is not a JSON object")
            )
            continue
        try:
            _check_unambiguous(bytes(raw))
        except SchemaInvalid as exc:
            # Not even its id can be trusted: it may be one of two.
            results.append(MemberError(index=index, id=None, reason=str(exc)))
            continue
        try:
            results.append(_event(members))
        except SchemaInvalid as exc:
            results.append(
                MemberError(index=index, id=_id_of(members), reason=str(exc))
            )
    return results


def _check_unambiguous(text: bytes) -> None:
    try:
        check_json(text)
    except UndecodableMessage as exc:
        raise SchemaInvalid(f"CloudEvent is ambiguous JSON: {exc}") from exc


def _event(members: _Members) -> CloudEventView:
    attributes: dict[str, AttributeValue | None] = {}
    raw_data = members.pop("data", None)
    raw_base64 = members.pop("data_base64", None)
    for name, raw in members.items():
        try:
            attributes[name] = _attribute_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise SchemaInvalid(
                f"{_where(members)}: attribute {name!r} is not a string, integer "
                f"or boolean: {exc}"
            ) from exc
    content_type = attributes.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise SchemaInvalid(f"{_where(members)}: datacontenttype must be a string")
    base64_text = _base64_text(_where(members), raw_base64)
    data: bytes | None = None
    data_is_json = False
    if base64_text is not None:
        if raw_data is not None:
            raise SchemaInvalid(
                f"{_where(members)}: 'data' and 'data_base64' are mutually exclusive"
            )
        data = _base64(_where(members), base64_text)
    elif raw_data is not None:
        data, data_is_json = _data(_where(members), raw_data, content_type)
    return from_attributes(attributes, data=data, data_is_json=data_is_json)


def _data(where: str, raw: msgspec.Raw, content_type: str | None) -> tuple[bytes, bool]:
    # An absent datacontenttype reads as application/json (JSON format 3.1.2).
    if content_type is None or is_json_media_type(content_type):
        return bytes(raw), True
    try:
        text = msgspec.json.decode(raw, type=str)
    except msgspec.ValidationError as exc:
        raise SchemaInvalid(
            f"{where}: 'data' must be a string for datacontenttype {content_type!r}"
        ) from exc
    return text.encode(), False


def _base64_text(where: str, raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        return _base64_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise SchemaInvalid(f"{where}: 'data_base64' must be a string") from exc


def _base64(where: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or a character outside ASCII
        raise SchemaInvalid(
            f"{where}: 'data_base64' is not valid base64: {exc}"
        ) from exc


def _id_of(members: _Members) -> str | None:
    raw = members.get("id")
    if raw is None:
        return None
    try:
        value = _attribute_decoder.decode(raw)
    except msgspec.ValidationError:
        return None
    return value if isinstance(value, str) else None


def _where(members: _Members) -> str:
    label = _id_of(members)
    return f"CloudEvent {label!r}" if label is not None else "CloudEvent"
