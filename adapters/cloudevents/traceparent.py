"""W3C Trace Context: the ``traceparent`` and ``tracestate`` headers.

``traceparent`` is ``version-traceid-parentid-flags`` in lower-case hex.
Version ``00`` is exactly 55 characters; version ``ff`` is forbidden; a
higher version is read leniently (its first four fields, when the 56th
character ends the string or is a dash), and re-emitted as version ``00``, as
the spec's versioning rules say. All-zero trace or parent ids are invalid.

``tracestate`` is a comma-separated list of at most 32 ``key=value``
members, keys unique, the entry of the system that wrote ``traceparent``
left-most. Keys follow the Level 2 grammar, which accepts every Level 1 key
(simple and ``tenant@system``). Empty members are allowed and skipped.

An invalid header is not an error of the message that carried it: the spec
says to ignore it and start a new trace. `parse_traceparent` raises
`TraceContextInvalid` (a ``ValueError``) with the rule that failed;
`extract` applies the spec's "ignore" rule and returns None instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import msgspec

__all__ = [
    "TraceContextInvalid",
    "TraceParent",
    "TraceState",
    "TraceContext",
    "parse_traceparent",
    "parse_tracestate",
    "extract",
    "MAX_TRACESTATE_MEMBERS",
]

#: Most list members a ``tracestate`` may hold.
MAX_TRACESTATE_MEMBERS = 32

_V00_LENGTH = 55
_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_KEY = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
_VALUE = re.compile(
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_OWS = " \t"
_FLAG_SAMPLED = 0x01
_FLAG_RANDOM = 0x02


class TraceContextInvalid(ValueError):
    """A ``traceparent`` or ``tracestate`` value breaks the spec; names the rule."""


class TraceParent(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed ``traceparent``.

    Attributes:
        version: the version it arrived with (0 unless a newer sender).
        trace_id: 32 lower-case hex digits, not all zero.
        parent_id: 16 lower-case hex digits, not all zero.
        trace_flags: the 8 flag bits as sent.
    """

    version: int
    trace_id: str
    parent_id: str
    trace_flags: int

    @property
    def sampled(self) -> bool:
        """Bit 0: the caller may have recorded trace data."""
        return bool(self.trace_flags & _FLAG_SAMPLED)

    @property
    def random(self) -> bool:
        """Bit 1 (Level 2): the trace id's right-most 7 bytes are random."""
        return bool(self.trace_flags & _FLAG_RANDOM)

    def header(self) -> str:
        """The header value to propagate: always version ``00``."""
        return f"00-{self.trace_id}-{self.parent_id}-{self.trace_flags:02x}"


class TraceState(msgspec.Struct, frozen=True):
    """A parsed ``tracestate``: ``(key, value)`` pairs, left-most first."""

    entries: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        """The value stored under *key*, if any."""
        return next((v for k, v in self.entries if k == key), None)

    def with_entry(self, key: str, value: str) -> TraceState:
        """Add or update *key*, moving it left-most; drop the right-most beyond 32.

        Raises:
            TraceContextInvalid: *key* or *value* breaks the grammar.
        """
        _check_member(key, value)
        rest = [(k, v) for k, v in self.entries if k != key]
        return TraceState(((key, value), *rest[: MAX_TRACESTATE_MEMBERS - 1]))

    def header(self) -> str:
        """The header value to propagate."""
        return ",".join(f"{k}={v}" for k, v in self.entries)

    def truncated(self, max_chars: int = 512) -> TraceState:
        """Fit in *max_chars*: drop entries over 128 characters, then from the right."""
        kept = list(self.entries)
        if len(self.header()) > max_chars:
            kept = [(k, v) for k, v in kept if len(k) + 1 + len(v) <= 128]
        while kept and len(TraceState(tuple(kept)).header()) > max_chars:
            kept.pop()
        return TraceState(tuple(kept))


class TraceContext(msgspec.Struct, frozen=True, kw_only=True):
    """What `extract` found: a valid ``traceparent`` and its ``tracestate``.

    Attributes:
        traceparent: the parsed parent.
        tracestate: the parsed state; empty when absent or invalid.
    """

    traceparent: TraceParent
    tracestate: TraceState = TraceState()


def parse_traceparent(value: str) -> TraceParent:
    """Parse a ``traceparent`` header value (surrounding whitespace ignored).

    Raises:
        TraceContextInvalid: naming the rule the value breaks.
    """
    text = value.strip(_OWS)
    if len(text) < 3 or not _HEX2.fullmatch(text[:2]) or text[2] != "-":
        raise TraceContextInvalid(
            "version is not two lower-case hex digits followed by '-'"
        )
    version = int(text[:2], 16)
    if version == 0xFF:
        raise TraceContextInvalid("version ff is forbidden")
    if version == 0 and len(text) != _V00_LENGTH:
        raise TraceContextInvalid(
            f"version 00 is {_V00_LENGTH} characters long, got {len(text)}"
        )
    if len(text) < _V00_LENGTH:
        raise TraceContextInvalid(
            f"shorter than {_V00_LENGTH} characters ({len(text)})"
        )
    if len(text) > _V00_LENGTH and text[_V00_LENGTH] != "-":
        raise TraceContextInvalid(
            "trace-flags of a higher version must be followed by '-' or the end"
        )
    trace_id, parent_id, flags = text[3:35], text[36:52], text[53:55]
    if not _HEX32.fullmatch(trace_id) or text[35] != "-":
        raise TraceContextInvalid(
            "trace-id is not 32 lower-case hex digits followed by '-'"
        )
    if not _HEX16.fullmatch(parent_id) or text[52] != "-":
        raise TraceContextInvalid(
            "parent-id is not 16 lower-case hex digits followed by '-'"
        )
    if not _HEX2.fullmatch(flags):
        raise TraceContextInvalid("trace-flags is not two lower-case hex digits")
    if trace_id == "0" * 32:
        raise TraceContextInvalid("trace-id is all zeros")
    if parent_id == "0" * 16:
        raise TraceContextInvalid("parent-id is all zeros")
    return TraceParent(
        version=version,
        trace_id=trace_id,
        parent_id=parent_id,
        trace_flags=int(flags, 16),
    )


def parse_tracestate(value: str | Sequence[str]) -> TraceState:
    """Parse a ``tracestate`` value, or several header fields combined in order.

    Raises:
        TraceContextInvalid: a member breaks the key or value grammar, a key
            repeats, or there are more than 32 members.
    """
    combined = value if isinstance(value, str) else ",".join(value)
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for member in _members(combined):
        key, eq, member_value = member.partition("=")
        if not eq:
            raise TraceContextInvalid(f"list member {member!r} has no '='")
        _check_member(key, member_value)
        if key in seen:
            raise TraceContextInvalid(f"key {key!r} appears more than once")
        seen.add(key)
        entries.append((key, member_value))
        if len(entries) > MAX_TRACESTATE_MEMBERS:
            raise TraceContextInvalid(
                f"more than {MAX_TRACESTATE_MEMBERS} list members"
            )
    return TraceState(tuple(entries))


def extract(headers: Mapping[str, str]) -> TraceContext | None:
    """Read trace context from HTTP headers (any case), applying the spec's rules.

    An invalid ``traceparent`` means no context (start a new trace) and its
    ``tracestate`` is not read; an invalid ``tracestate`` is dropped without
    affecting a valid ``traceparent``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_parent = lowered.get("traceparent")
    if raw_parent is None:
        return None
    try:
        parent = parse_traceparent(raw_parent)
    except TraceContextInvalid:
        return None
    raw_state = lowered.get("tracestate")
    try:
        state = parse_tracestate(raw_state) if raw_state is not None else TraceState()
    except TraceContextInvalid:
        state = TraceState()
    return TraceContext(traceparent=parent, tracestate=state)


def _members(combined: str) -> Iterable[str]:
    for part in combined.split(","):
        member = part.strip(_OWS)
        if member:
            yield member


def _check_member(key: str, value: str) -> None:
    if not _KEY.fullmatch(key):
        raise TraceContextInvalid(
            f"key {key!r} is not a lower-case letter or digit followed by at most "
            "255 of a-z 0-9 _ - * / @"
        )
    if not _VALUE.fullmatch(value):
        raise TraceContextInvalid(
            f"value of {key!r} is not 1-256 printable ASCII characters without "
            "',' or '=' ending in a non-space"
        )
