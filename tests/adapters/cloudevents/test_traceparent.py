"""W3C Trace Context: traceparent validation and tracestate's list grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.cloudevents import (
    TraceContextInvalid,
    TraceParent,
    TraceState,
    extract,
    parse_traceparent,
    parse_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_a_valid_version_00_header_is_parsed() -> None:
    """The four fields come apart; bit 0 of the flags is ``sampled``."""
    parent = parse_traceparent(VALID)
    assert parent == TraceParent(
        version=0, trace_id=TRACE, parent_id=PARENT, trace_flags=1
    )
    assert parent.sampled
    assert not parent.random
    assert not parse_traceparent(f"00-{TRACE}-{PARENT}-00").sampled


def test_surrounding_whitespace_is_optional_whitespace() -> None:
    """OWS around a header value is not part of it."""
    assert parse_traceparent(f"  {VALID}\t").trace_id == TRACE


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (f"ff-{TRACE}-{PARENT}-01", "version ff is forbidden"),
        (f"00-{TRACE.upper()}-{PARENT}-01", "trace-id is not 32 lower-case"),
        (f"00-{TRACE}-{PARENT.upper()}-01", "parent-id is not 16 lower-case"),
        (f"00-{TRACE}-{PARENT}-0A", "trace-flags is not two lower-case"),
        (f"0A-{TRACE}-{PARENT}-01", "version is not two lower-case"),
        (f"00-{'0' * 32}-{PARENT}-01", "trace-id is all zeros"),
        (f"00-{TRACE}-{'0' * 16}-01", "parent-id is all zeros"),
        (f"00-{TRACE}-{PARENT}-01-extra", "version 00 is 55 characters"),
        (f"00-{TRACE}-{PARENT}-1", "version 00 is 55 characters"),
        (f"00-{TRACE[:-1]}g-{PARENT}-01", "trace-id is not 32"),
        (f"00_{TRACE}_{PARENT}_01", "version is not two lower-case"),
        (
            f"00-{TRACE}_{PARENT}-01",
            "trace-id is not 32 lower-case hex digits followed",
        ),
        ("", "version is not two"),
        ("00", "version is not two"),
    ],
)
def test_invalid_values_name_the_rule(value: str, reason: str) -> None:
    """Every spec rule the value breaks is reported by name."""
    with pytest.raises(TraceContextInvalid, match=reason):
        parse_traceparent(value)


def test_a_future_version_is_parsed_leniently() -> None:
    """Higher versions: the first four fields are used, the rest ignored."""
    parent = parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-holds")
    assert (parent.version, parent.trace_id, parent.parent_id) == (0xCC, TRACE, PARENT)
    assert parent.header() == VALID
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-00").version == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (f"cc-{TRACE}-{PARENT}-01x", "followed by '-' or the end"),
        (f"cc-{TRACE}-{PARENT}-1", "shorter than 55"),
        (f"cc-{TRACE.upper()}-{PARENT}-01-x", "trace-id"),
        (f"cc-{'0' * 32}-{PARENT}-01", "all zeros"),
    ],
)
def test_future_versions_still_follow_the_known_fields(value: str, reason: str) -> None:
    """Lenient is not lax: the known fields must still be valid."""
    with pytest.raises(TraceContextInvalid, match=reason):
        parse_traceparent(value)


@given(
    trace=st.binary(min_size=16, max_size=16).filter(any),
    parent=st.binary(min_size=8, max_size=8).filter(any),
    flags=st.integers(min_value=0, max_value=255),
)
def test_every_valid_header_round_trips(
    trace: bytes, parent: bytes, flags: int
) -> None:
    """A parsed version-00 header renders back to itself."""
    value = f"00-{trace.hex()}-{parent.hex()}-{flags:02x}"
    assert parse_traceparent(value).header() == value


def test_tracestate_keeps_order_and_skips_empty_members() -> None:
    """Members stay in order; OWS and empty members are allowed."""
    state = parse_tracestate(" rojo=00f067aa0ba902b7 ,, \t congo=t61rcWkgMzE ,")
    assert state.entries == (("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE"))
    assert state.get("congo") == "t61rcWkgMzE"
    assert state.get("absent") is None
    assert parse_tracestate("") == TraceState()


def test_several_tracestate_fields_combine_in_order() -> None:
    """Multiple header fields are one list, joined with commas."""
    state = parse_tracestate(["rojo=1", "congo=2"])
    assert state.header() == "rojo=1,congo=2"


def test_multi_tenant_keys_and_spaces_inside_values_are_allowed() -> None:
    """``tenant@system`` keys; a value may hold spaces but not end in one."""
    state = parse_tracestate("fw529a3039@dt=FW4; 0; 0,1a-2f@x=y")
    assert state.entries == (("fw529a3039@dt", "FW4; 0; 0"), ("1a-2f@x", "y"))


def test_thirty_two_members_pass_and_thirty_three_do_not() -> None:
    """The list holds at most 32 members."""
    members = [f"k{i}=v{i}" for i in range(33)]
    assert len(parse_tracestate(",".join(members[:32])).entries) == 32
    with pytest.raises(TraceContextInvalid, match="more than 32"):
        parse_tracestate(",".join(members))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("rojo=1,rojo=2", "appears more than once"),
        ("Rojo=1", "key 'Rojo'"),
        ("_rojo=1", "key '_rojo'"),
        ("rojo", "has no '='"),
        ("rojo=a=b", "value of 'rojo'"),
        ("rojo=", "value of 'rojo'"),
        ("rojo=caf\u00e9", "value of 'rojo'"),
        (f"{'k' * 257}=v", "key"),
        (f"k={'v' * 257}", "value of 'k'"),
    ],
)
def test_tracestate_grammar_violations(value: str, reason: str) -> None:
    """Keys and values follow the spec's ABNF; keys are unique."""
    with pytest.raises(TraceContextInvalid, match=reason):
        parse_tracestate(value)


def test_an_updated_entry_moves_to_the_left() -> None:
    """Mutation rule: a modified or new key goes first; others keep order."""
    state = parse_tracestate("rojo=1,congo=2,other=3")
    assert state.with_entry("congo", "9").header() == "congo=9,rojo=1,other=3"
    assert state.with_entry("new", "x").header() == "new=x,rojo=1,congo=2,other=3"


def test_truncation_drops_long_entries_first_then_from_the_right() -> None:
    """Whole entries go: over-128-character ones first, then right-most."""
    long_entry = "big=" + "x" * 200
    state = parse_tracestate(f"a=1,{long_entry},b=2,c=3")
    assert state.truncated(20).header() == "a=1,b=2,c=3"
    assert state.truncated(8).header() == "a=1,b=2"
    assert state.truncated(1000) == state


def test_extract_ignores_tracestate_when_traceparent_is_invalid() -> None:
    """A bad traceparent means a new trace; its tracestate is not read."""
    assert extract({"traceparent": "ff-" + VALID[3:], "tracestate": "a=1"}) is None
    assert extract({}) is None


def test_extract_keeps_traceparent_when_only_tracestate_is_invalid() -> None:
    """A bad tracestate does not spoil a good traceparent."""
    context = extract({"TraceParent": VALID, "TraceState": "BAD KEY=1"})
    assert context is not None
    assert context.traceparent.parent_id == PARENT
    assert context.tracestate == TraceState()
    good = extract({"traceparent": VALID, "tracestate": "rojo=1"})
    assert good is not None
    assert good.tracestate.get("rojo") == "1"
