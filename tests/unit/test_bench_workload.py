"""The benchmark's workload generator and report maths (no services needed)."""

from __future__ import annotations

import random
from decimal import Decimal

import msgspec
import pytest

from bench.harness import CpuMeter, compare_balances
from bench.workload import (
    OutputCounter,
    Tally,
    Workload,
    entry_id,
    merge_expected,
    parse_entry_id,
    percentile,
    publish_order,
)
from broker.codec import Decoders, decode_envelope
from canonical.ledger import LedgerEntryPosted


def _workload(
    *, phase: str = "d", messages: int = 5000, seed: int = 7, stamped: bool = False
) -> Workload:
    return Workload(
        phase=phase,
        messages=messages,
        accounts=50,
        duplicates=0.1,
        seed=seed,
        stamped=stamped,
    )


def test_publish_order_repeats_exactly_the_fraction_and_after_the_original() -> None:
    """A tenth of positions repeat an entry, >= gap entries back once possible."""
    order = publish_order(10_000, 0.1, random.Random(1), gap=1024)
    distinct = max(order) + 1
    assert len(order) == 10_000
    assert distinct == 9_000
    seen: set[int] = set()
    fresh = 0
    for index in order:
        if index in seen:
            assert index < (fresh - 1024 if fresh > 1024 else fresh)
        else:
            assert index == fresh  # new entries appear in index order
            seen.add(index)
            fresh += 1


def test_publish_order_refuses_nonsense() -> None:
    """No messages, or more than half duplicates, are errors."""
    with pytest.raises(ValueError, match="at least 1"):
        publish_order(0, 0.1, random.Random(1))
    with pytest.raises(ValueError, match=r"between 0 and 0\.5"):
        publish_order(10, 0.6, random.Random(1))


def test_duplicates_are_the_same_bytes_and_identity() -> None:
    """A repeat re-publishes its original's envelope bytes and message id unchanged."""
    w = _workload()
    first: dict[int, bytes] = {}
    repeats = 0
    for position in range(w.messages):
        posting = w.posting(position)
        if posting.index in first:
            repeats += 1
            assert posting.body == first[posting.index]
        else:
            first[posting.index] = posting.body
    assert repeats == 500
    assert w.distinct == 4500


def test_postings_are_canonical_ledger_envelopes() -> None:
    """Each body decodes with the engine's codec; key and correlation id are derived."""
    posting = _workload().posting(3)
    envelope = decode_envelope(posting.body, max_bytes=1 << 20)
    event = Decoders({"ledger.entry.posted": LedgerEntryPosted}).decode_data(envelope)
    assert isinstance(event, LedgerEntryPosted)
    assert envelope.id == posting.message_id
    assert envelope.correlation_id == event.account == posting.account
    assert envelope.idempotency_key == f"ledger:{event.entry_id}"
    assert parse_entry_id(event.entry_id) == ("d", posting.index, None)


def test_same_seed_same_workload() -> None:
    """Generation is deterministic for a seed (message ids, accounts, amounts)."""
    a, b = _workload(), _workload()
    assert [a.posting(p).message_id for p in range(100)] == [
        b.posting(p).message_id for p in range(100)
    ]
    assert a.expected() == b.expected()
    assert a.expected() != _workload(seed=8).expected()


def test_expected_balances_sum_the_distinct_entries_once() -> None:
    """Balances add each distinct entry once, however often it is published."""
    w = Workload(phase="d", messages=2000, accounts=3, duplicates=0.1, seed=7)
    total = sum((w.amount(i) for i in range(w.distinct)), Decimal(0))
    expected = w.expected()
    assert sum(n for _, n in expected.values()) == w.distinct
    assert sum((b for b, _ in expected.values()), Decimal(0)) == total
    assert set(expected) <= {"acct-00000", "acct-00001", "acct-00002"}


def test_stamped_postings_carry_their_publish_time_and_repeat_it() -> None:
    """Latency ids hold the first publish's time; repeats reuse that posting."""
    w = _workload(phase="l", messages=3000, stamped=True)
    postings = [w.posting(p) for p in range(w.messages)]
    by_index: dict[int, bytes] = {}
    for posting in postings:
        by_index.setdefault(posting.index, posting.body)
        assert by_index[posting.index] == posting.body
    data = msgspec.json.decode(postings[0].body)["data"]
    phase, index, stamp = parse_entry_id(data["entry_id"])
    assert (phase, index) == ("l", 0)
    assert stamp is not None
    assert stamp > 0


def test_entry_ids_round_trip_and_strangers_are_refused() -> None:
    """entry_id and parse_entry_id are inverses; anything else is a ValueError."""
    assert parse_entry_id(entry_id("d", 12)) == ("d", 12, None)
    assert parse_entry_id(entry_id("l", 3, 99)) == ("l", 3, 99)
    with pytest.raises(ValueError, match="not a bench entry id"):
        parse_entry_id("x")


def test_percentile_interpolates_like_numpy() -> None:
    """Linear interpolation between closest ranks (numpy's default method)."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_tally_finishes_on_distinct_entries_and_measures_first_arrivals() -> None:
    """Repeats do not count towards a deduplicating target; latency is per entry."""
    tally = Tally(phase="l", distinct=2, target=2)
    tally.record(0, 1_000_000, 3_000_000)
    tally.record(0, 1_000_000, 9_000_000)  # a repeated output: no second latency
    assert not tally.done.is_set()
    tally.record(1, 2_000_000, 4_000_000)
    tally.record(5, None, 5_000_000)  # no such entry
    assert tally.done.is_set()
    assert tally.done_ns == 4_000_000
    assert (tally.new, tally.total, tally.unknown) == (2, 3, 1)
    assert tally.latency_ms(50) == pytest.approx(2.0)


def test_tally_counting_all_outputs_waits_for_the_repeats() -> None:
    """A pass-through target counts every output, repeats included."""
    tally = Tally(phase="d", distinct=2, target=3, count_all=True)
    for index in (0, 1):
        tally.record(index, None, 1)
    assert not tally.done.is_set()
    tally.record(0, None, 2)
    assert tally.done.is_set()


def test_counter_routes_outputs_by_phase_and_counts_strangers() -> None:
    """Outputs go to their phase's tally; undecodable or unknown ones are foreign."""
    counter = OutputCounter()
    tally = counter.expect(Tally(phase="d", distinct=1, target=1))
    counter.record(b'{"data": {"entry_id": "d.0"}}', 1)
    counter.record(b'{"data": {"entry_id": "z.0"}}', 2)
    counter.record(b"not json", 3)
    assert tally.done.is_set()
    assert counter.foreign == 2


def test_merge_and_compare_balances() -> None:
    """Expected balances of two phases add up; any difference is reported."""
    merged = merge_expected(
        {"a": (Decimal("1.50"), 1)}, {"a": (Decimal("2"), 2), "b": (Decimal(1), 1)}
    )
    assert merged == {"a": (Decimal("3.50"), 3), "b": (Decimal(1), 1)}
    assert compare_balances(merged, dict(merged)) == []
    problems = compare_balances(
        merged, {"a": (Decimal("3.5"), 2), "c": (Decimal(0), 1)}
    )
    assert problems[0].startswith("2 wrong balances")
    assert problems[1].startswith("1 unexpected accounts")


def test_cpu_delta_counts_new_processes_from_zero() -> None:
    """CPU seconds per role are differences; a process born in between counts whole."""
    before = {"postgres": {1: 2.0}, "daemon": {9: 1.0}}
    after = {"postgres": {1: 2.5, 2: 0.25}, "daemon": {9: 4.0}}
    assert CpuMeter.delta(before, after) == {"postgres": 0.75, "daemon": 3.0}


def test_latency_percentiles_can_leave_out_a_warm_up() -> None:
    tally = Tally(phase="l", distinct=4, target=4, count_all=False)
    for index, (stamp, latency) in enumerate([(0, 900), (10, 800), (20, 5), (30, 7)]):
        tally.record(index, stamp * 1_000_000, (stamp + latency) * 1_000_000)
    assert tally.latency_ms(100) == 900
    assert tally.latency_ms(100, since_ns=20_000_000) == 7
    assert tally.latency_ms(50, since_ns=40_000_000) is None
