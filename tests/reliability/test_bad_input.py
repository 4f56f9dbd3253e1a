"""Bad input (§7: 17 malformed, 18 oversize, 19 schema-invalid / unknown type).

Bad messages are published raw, next to a good workload, the way a broken
producer would send them. Each must become exactly one dead letter with its
original bytes and a reason, at once (attempts = 1, no retry), with a copy
on ``q2c.dead``; the good workload must come through untouched and the
daemon must stay healthy.
"""

from __future__ import annotations

from decimal import Decimal

import aio_pika
import aiormq.exceptions
import anyio
import msgspec
import pytest

from broker.codec import encode_envelope, encode_event, utcnow
from broker.transport import OutgoingMessage
from canonical import Envelope
from tests.reliability.checker import (
    connect,
    drain_state,
    journal_stages,
    wait_dead_letters,
)
from tests.reliability.faults import max_message_size, queue_stats
from tests.reliability.harness import brokerctl
from tests.reliability.scenario import Scenario
from tests.reliability.trees import VOIDED, LedgerEntryVoided
from tests.reliability.workload import Entry, Workload, raw_message, take

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

MiB = 1024 * 1024


def envelope_with_data(data: bytes, *, entry_id: str = "bad") -> bytes:
    """A well-formed envelope whose ``data`` is *data*, verbatim."""
    return encode_envelope(
        Envelope(
            id=f"demo-{entry_id}",
            source="/test/ledger",
            type="ledger.entry.posted",
            time=utcnow(),
            correlation_id="acct-bad",
            idempotency_key=f"ledger:{entry_id}",
            data=msgspec.Raw(data),
        )
    )


def malformed() -> list[OutgoingMessage]:
    """One message per way of being malformed (RELIABILITY.md §6.6)."""
    good = Entry(account="acct-bad", entry_id="b1", amount=Decimal(1)).message().body
    entry = b'{"type":"ledger.entry.posted","account":"acct-bad","entry_id":"n",'
    return [
        raw_message("not-json", b"{this is not json"),
        raw_message(
            "not-utf8", good.replace(b'"source":"/demo/', b'"source":"/\xff\xfe/')
        ),
        raw_message(
            "xml",
            b"<entry><amount>1</amount></entry>",
            content_type="application/xml",
        ),
        raw_message("truncated", good[: len(good) // 2]),
        raw_message("duplicate-keys", good.replace(b'"id":', b'"id":"x","id":', 1)),
        raw_message("deep", envelope_with_data(b"[" * 10_000 + b"]" * 10_000)),
        raw_message(
            "huge-number", envelope_with_data(entry + b'"amount":' + b"9" * 5000 + b"}")
        ),
        # A valid entry, but its outputs could never be published: their AMQP
        # correlation id would be over 255 bytes.
        raw_message(
            "long-correlation",
            good.replace(
                b'"correlationid":"acct-bad"', b'"correlationid":"' + b"c" * 300 + b'"'
            ),
        ),
        # A NUL in a key PostgreSQL would store as text: it cannot.
        raw_message(
            "nul-key",
            good.replace(
                b'"correlationid":"acct-bad"', b'"correlationid":"acct\\u0000"'
            ),
        ),
    ]


async def test_malformed_input_is_dead_lettered_at_once_with_its_bytes(
    scenario: Scenario,
) -> None:
    """Scenario 17: each malformed message → one ``malformed`` dead letter, no retry.

    Invalid JSON, invalid UTF-8, an XML body, a truncated body, duplicate
    keys, 10k-deep nesting, a 5000-digit number, a correlation id too long
    for the AMQP property its outputs carry it in, a NUL in a correlation id
    (PostgreSQL's text cannot hold one), and a valid envelope sent
    as ``text/plain`` (a wrong content type is malformed, RELIABILITY.md §6.6).
    """
    daemon = scenario.daemon
    workload = Workload.build(1000)
    plain = Entry(account="acct-ct", entry_id="ct-1", amount=Decimal("5.00"))
    as_text = msgspec.structs.replace(plain.message(), content_type="text/plain")
    bad = [*malformed(), as_text]
    stream = [*workload.stream[:500], *bad, *workload.stream[500:]]
    await daemon.start()
    await daemon.wait_ready()
    assert (await scenario.publish(stream)).confirmed == len(stream)

    letters = await wait_dead_letters(scenario.pg_dsn, len(bad))
    by_id = {letter["message_id"]: letter for letter in letters}
    assert set(by_id) == {m.message_id for m in bad}
    for m in bad:
        letter = by_id[m.message_id]
        assert (letter["reason"], letter["attempts"]) == ("malformed", 1), letter
        assert letter["body"] == m.body
        assert letter["queue"].startswith("q2c.wf.ledger.")
        assert await journal_stages(scenario.pg_dsn, m.message_id) == ["dead_lettered"]
    status = await daemon.status()
    assert status["counters"]["messages_dead_lettered"] == len(bad)

    outcome = await scenario.finish(workload)
    assert outcome.report.dead_letters == len(bad)
    copies = await take(scenario.amqp_url, "q2c.dead", len(bad))
    assert {c.message_id: c.body for c in copies} == {m.message_id: m.body for m in bad}
    assert {c.headers["x-q2c-reason"] for c in copies} == {"malformed"}


async def test_oversize_input_is_dead_lettered_without_being_decoded(
    scenario: Scenario,
) -> None:
    """Scenario 18 (daemon side): bodies over ``max-message-bytes`` → ``oversize``.

    A 5000-byte body of invalid UTF-8 is ``oversize``, not ``malformed``: the
    size is checked before any decoding. A valid but padded envelope is
    ``oversize`` too. Both keep their bytes; the workload is untouched. A
    body past ``max-dead-letter-bytes`` is not buffered whole: its letter
    keeps that many bytes and one more, and says it was cut.
    """
    daemon = scenario.daemon
    workload = Workload.build(1000)
    pad = b'{"type":"ledger.entry.posted","pad":"' + b"x" * 5000 + b'"}'
    bad = [
        raw_message("garbage", b"\xff" * 5000),
        raw_message("huge", b"\xff" * 20_000),
        raw_message("padded", envelope_with_data(pad, entry_id="padded")),
    ]
    stream = [*workload.stream[:500], *bad, *workload.stream[500:]]
    limits = {"max-message-bytes": 4096, "max-dead-letter-bytes": 8192}
    await daemon.start({"core": limits})
    await daemon.wait_ready()
    assert (await scenario.publish(stream)).confirmed == len(stream)

    letters = await wait_dead_letters(scenario.pg_dsn, len(bad))
    letters.sort(key=lambda r: r["message_id"])
    for m, letter in zip(bad, letters, strict=True):
        assert letter["message_id"] == m.message_id
        assert (letter["reason"], letter["attempts"]) == ("oversize", 1), letter
        if m.message_id == "bad-huge":
            assert letter["body"] == m.body[:8193]
            assert "20000 bytes declared" in letter["detail"], letter["detail"]
            assert "cut" in letter["detail"]
        else:
            assert letter["body"] == m.body
            assert "4096-byte limit" in letter["detail"]

    outcome = await scenario.finish(workload)
    assert outcome.report.dead_letters == len(bad)


async def publish_raw(url: str, body: bytes) -> None:
    """Publish *body* to a fresh confirming channel (raises what the broker says)."""
    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id="too-big"), "q2c.dead", timeout=10
        )


@pytest.mark.chaos
async def test_a_body_over_the_broker_limit_closes_the_channel_not_the_daemon(
    scenario: Scenario,
) -> None:
    """Scenario 18 (broker side): ``max_message_size`` lowered to 1 MiB at runtime.

    A producer publishing 2 MiB has its channel closed (406
    PRECONDITION_FAILED). The daemon, holding a 1.5 MiB message that came
    in before the limit, dead-letters it as ``oversize``; its relay's copy
    to ``q2c.dead`` is refused the same way, and the relay reports it and
    keeps the row unsent while the daemon keeps working. Once the limit is
    restored the copy goes out and the outbox drains.
    """
    daemon = scenario.daemon
    workload = Workload.build(500)
    big = raw_message("big", b"\x00" * (MiB + MiB // 2))
    await daemon.declare()
    assert (await scenario.publish([big])).confirmed == 1
    async with max_message_size(MiB):
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await publish_raw(scenario.amqp_url, b"\x00" * (2 * MiB))
        await daemon.start()  # after the change: its channels get the new limit
        await daemon.wait_ready()
        assert (await scenario.publish(workload.stream)).confirmed == len(
            workload.stream
        )
        [letter] = await wait_dead_letters(scenario.pg_dsn, 1)
        assert (letter["reason"], letter["body"]) == ("oversize", big.body)
        refused = await daemon.wait_log(lambda e: "PRECONDITION_FAILED" in str(e))
        assert refused["event"] == "amqp_channel_closed"
        status = await daemon.status()
        assert status["store"]["outbox_pending"] >= 1
        assert daemon.returncode is None

    outcome = await scenario.finish(workload)
    assert outcome.report.dead_letters == 1
    [copy] = await take(scenario.amqp_url, "q2c.dead", 1)
    assert (copy.message_id, copy.body) == (big.message_id, big.body)


@pytest.mark.chaos
async def test_a_row_the_broker_refuses_does_not_hold_back_the_rows_behind_it(
    scenario: Scenario,
) -> None:
    """Scenario 18 (relay): while one oversize copy is refused, the others go out.

    The 1.5 MiB message sits in the backlog between good entries, so its
    dead-letter copy shares a batch, and a publish, with their outputs. The
    broker closes the channel for it; its rounds shrink until it goes alone,
    and, refused alone three times, it is parked with the broker's reason.
    """
    daemon = scenario.daemon
    workload = Workload.build(500)
    big = raw_message("big", b"\x00" * (MiB + MiB // 2))
    stream = [*workload.stream[:200], big, *workload.stream[200:]]
    await daemon.declare()
    assert (await scenario.publish(stream)).confirmed == len(stream)
    async with max_message_size(MiB):
        await daemon.start()
        await daemon.wait_ready()
        await wait_dead_letters(scenario.pg_dsn, 1)
        with anyio.move_on_after(10):
            while True:
                applied, pending = await drain_state(scenario.pg_dsn)
                if applied >= len(workload.entries) and pending <= 1:
                    break
                await anyio.sleep(0.2)  # bounded poll: the outbox has no event
        applied, pending = await drain_state(scenario.pg_dsn)
        assert applied == len(workload.entries)
        assert pending <= 1, f"{pending - 1} good rows held back by the refused one"
        reason = await parked_reason(scenario.pg_dsn)
    assert "refused by the broker" in reason
    assert "message size" in reason


async def parked_reason(dsn: str) -> str:
    """The reason of the one parked outbox row, once there is one (bounded)."""
    with anyio.fail_after(60):
        while True:
            async with connect(dsn) as conn:
                reasons = await conn.fetch(
                    "SELECT parked_reason FROM outbox WHERE parked_reason IS NOT NULL"
                )
            if reasons:
                (row,) = reasons
                return str(row[0])
            await anyio.sleep(0.2)  # bounded poll: the outbox has no event


def voided_message(account: str, entry_id: str, amount: Decimal) -> OutgoingMessage:
    """A ``ledger.entry.voided`` sent straight to shard queue 0 (default exchange)."""
    env = Envelope(
        id=f"demo-{entry_id}",
        source="/test/ledger",
        type=VOIDED,
        time=utcnow(),
        correlation_id=account,
        idempotency_key=f"ledger:{entry_id}",
        data=encode_event(
            LedgerEntryVoided(account=account, entry_id=entry_id, amount=amount)
        ),
    )
    return OutgoingMessage(
        exchange="",
        routing_key="q2c.wf.ledger.0",
        body=encode_envelope(env),
        message_id=env.id,
        correlation_id=account,
        type=VOIDED,
    )


async def test_unknown_type_is_dead_lettered_then_redriven_exactly_once(
    scenario: Scenario,
) -> None:
    """Scenario 19: ``schema_invalid`` / ``unknown_type``; replay after the deploy.

    A schema-invalid amount and an unknown type become dead letters. After
    a restart with a tree that handles the type, ``brokerctl dlq replay
    --reason unknown_type`` applies it exactly once; a second replay finds
    nothing to replay (only parked letters are replayed).
    """
    daemon = scenario.daemon
    workload = Workload.build(500)
    posted = Entry(account="acct-void", entry_id="v-post", amount=Decimal("100.00"))
    # The void, as the checker sees it: one more entry of -40 on acct-void.
    void = Entry(account="acct-void", entry_id="v-1", amount=Decimal("-40.00"))
    unknown = voided_message("acct-void", "v-1", Decimal("40.00"))
    schema = raw_message(
        "schema",
        posted.message().body.replace(b'"amount":"100.00"', b'"amount":"abc"'),
    )
    await daemon.start()
    await daemon.wait_ready()
    stream = [*workload.stream, posted.message(), schema, unknown]
    assert (await scenario.publish(stream)).confirmed == len(stream)

    letters = await wait_dead_letters(scenario.pg_dsn, 2)
    reasons = {letter["message_id"]: letter["reason"] for letter in letters}
    assert reasons == {
        schema.message_id: "schema_invalid",
        unknown.message_id: "unknown_type",
    }
    [letter] = [x for x in letters if x["reason"] == "unknown_type"]
    assert (letter["queue"], letter["body"]) == ("q2c.wf.ledger.0", unknown.body)

    assert await daemon.stop() == 0
    await daemon.start(
        {"daemon": {"tree": "tests.reliability.trees:build_voiding_tree"}}
    )
    await daemon.wait_ready()
    socket = daemon.spec.socket_path
    replayed = await brokerctl(socket, "dlq", "replay", "--reason", "unknown_type")
    assert replayed == {"replayed": [letter["id"]], "skipped": [], "matched": 1}

    outcome = await scenario.finish(workload, extra=[posted, void], silent=[void])
    assert outcome.report.effects[unknown.message_id] == 1
    stages = await journal_stages(scenario.pg_dsn, unknown.message_id)
    assert stages == ["dead_lettered", "applied"]

    # Again, on a fresh daemon: nothing is parked under that reason any more.
    await daemon.start(
        {"daemon": {"tree": "tests.reliability.trees:build_voiding_tree"}}
    )
    await daemon.wait_ready()
    none = {"replayed": [], "skipped": [], "matched": 0}
    assert await brokerctl(socket, "dlq", "replay", "--reason", "unknown_type") == none
    assert await brokerctl(socket, "dlq", "replay", str(letter["id"])) == none
    [after] = await brokerctl(socket, "dlq", "list", "--reason", "unknown_type",
                              "--status", "any")  # fmt: skip
    assert (after["status"], after["replays"]) == ("replayed", 1)
    assert await daemon.stop() == 0
    stats = await queue_stats(scenario.amqp_url, ["q2c.wf.ledger.0"])
    assert stats["q2c.wf.ledger.0"].ready == 0
    assert await journal_stages(scenario.pg_dsn, unknown.message_id) == stages
