"""The system actor on the in-process transport and SQLite, with a fake connector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from time import monotonic
from typing import Any, cast

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from broker.codec import encode_envelope, encode_event, utcnow
from broker.config import Config, load_config
from broker.errors import (
    ConfigError,
    RetryLater,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.gateway import GatewaySettings, SystemGateway, system_actor_spec
from broker.letters import message_id_for
from broker.limits import BreakerState
from broker.outbox import OutboxRelay
from broker.runtime import Runtime
from broker.store import (
    BatchRead,
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRow,
    InboxKey,
    OutboxRow,
    Store,
)
from broker.store.sqlite import SqliteStore
from broker.supervision import ChildSpec, Strategy, SupervisorSpec
from broker.system import ActorSystem
from broker.transport import Delivery, OutgoingMessage, PublishOutcome, Transport
from broker.transport.memory import MemoryTransport
from broker.transport.topology import build_topology
from canonical import Envelope, Event
from tests.polling import eventually
from tests.runtime.journal import Journal

pytestmark = pytest.mark.anyio

QUEUE = "q2c.sys.erp"
OUT = "q2c.events.erp-out"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class CreateOrder(Event, frozen=True, tag="test.order.create"):
    """The command: create an order in the ERP. The other fields script the fake."""

    order_id: str
    fail_times: int = 0  # answer "unavailable" to this many calls first
    hang_times: int = 0  # never answer this many calls first
    retry_after_s: float | None = None
    reject: bool = False
    bug: bool = False  # the connector fails with a bug, not the system
    defer_times: int = 0  # the connector waits on a lock this many calls first


class OrderCreated(Event, frozen=True, tag="test.order.created"):
    """The result: the ERP's id for the order."""

    order_id: str
    erp_id: str


class FakeTime:
    """A clock and a sleep that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def clock(self) -> float:
        """The current fake time."""
        return self.now

    async def sleep(self, delay: float) -> None:
        """Wait until the test has moved the clock *delay* seconds on."""
        wake = anyio.Event()
        entry = (self.now + delay, wake)
        self._sleepers.append(entry)
        try:
            await wake.wait()
        finally:
            self._sleepers.remove(entry)

    @property
    def sleeping(self) -> int:
        """How many tasks are waiting for the clock."""
        return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move the clock on and wake whoever is due."""
        self.now += seconds
        for due, wake in self._sleepers:
            if due <= self.now:
                wake.set()


class FakeErp:
    """A connector whose system keeps one effect per idempotency key.

    Records every call (key, breaker state, fake time) and the most calls it
    ever had in flight at once. ``outage`` makes every call fail; ``gate``,
    when set, holds every call until it opens.
    """

    system = "erp"
    commands: Mapping[str, type[Any]] = {"test.order.create": CreateOrder}

    def __init__(self, time: FakeTime | None = None) -> None:
        self.time = time
        self.gateway: SystemGateway | None = None
        self.calls: list[tuple[str, str, float]] = []
        #: ``first_attempt`` of every call, in call order.
        self.firsts: list[bool] = []
        self.journal = Journal()
        self.effects: dict[str, str] = {}
        self.failed: dict[str, int] = {}
        self.hung: dict[str, int] = {}
        self.deferred: dict[str, int] = {}
        self.outage = False
        self.gate: anyio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def keys(self) -> list[str]:
        """The idempotency key of every call, in call order."""
        return [key for key, _, _ in self.calls]

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Create the order once per key; fail, hang or refuse as scripted."""
        assert isinstance(command, CreateOrder)
        key = envelope.idempotency_key
        state = self.gateway.breaker.state.value if self.gateway else ""
        self.calls.append((key, state, self.time.now if self.time else 0.0))
        self.firsts.append(first_attempt)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.journal.add("call")
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.outage:
                raise UpstreamUnavailable("erp", "503 Service Unavailable")
            if self.hung.setdefault(key, 0) < command.hang_times:
                self.hung[key] += 1
                await anyio.sleep_forever()
            if self.failed.setdefault(key, 0) < command.fail_times:
                self.failed[key] += 1
                raise UpstreamUnavailable(
                    "erp", "busy", retry_after_s=command.retry_after_s
                )
            if command.reject:
                raise UpstreamRejected("erp", "customer 42 is blocked", code="BLOCKED")
            if command.bug:
                raise RuntimeError(f"no mapping for order {command.order_id}")
            if self.deferred.setdefault(key, 0) < command.defer_times:
                self.deferred[key] += 1
                raise RetryLater(f"another daemon holds {command.order_id}'s key")
            erp_id = self.effects.setdefault(key, f"erp-{len(self.effects) + 1}")
            return [OrderCreated(order_id=command.order_id, erp_id=erp_id)]
        finally:
            self.in_flight -= 1


def config(**overrides: str) -> Config:
    env = {
        "BROKER__TOPOLOGY__SYSTEMS": '["erp"]',
        "BROKER__TOPOLOGY__RETRY_TIERS_S": "[0.05, 0.1]",
        "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{OUT}" = ["test.order.created"]}}',
        "BROKER__CORE__MAX_ATTEMPTS": "3",
        "BROKER__CORE__MAX_MESSAGE_BYTES": "4096",
        "BROKER__DAEMON__SHUTDOWN_S": "5",
        **overrides,
    }
    return load_config(environ=env)


def command(
    order_id: str,
    *,
    key: str | None = None,
    message_id: str | None = None,
    **fields: Any,
) -> OutgoingMessage:
    """The AMQP message a workflow's outbox sends to the ERP's queue."""
    env = Envelope(
        id=message_id or f"cmd-{order_id}",
        source="/q2c/deal",
        type="test.order.create",
        time=utcnow(),
        subject=f"order/{order_id}",
        correlation_id=f"deal-{order_id}",
        idempotency_key=key or f"deal:{order_id}/erp.create",
        traceparent=TRACEPARENT,
        data=encode_event(CreateOrder(order_id=order_id, **fields)),
    )
    return raw(
        encode_envelope(env), message_id=env.id, correlation_id=env.correlation_id
    )


def raw(body: bytes, *, message_id: str, correlation_id: str = "") -> OutgoingMessage:
    return OutgoingMessage(
        exchange="",
        routing_key=QUEUE,
        body=body,
        message_id=message_id,
        correlation_id=correlation_id or None,
        type="test.order.create",
    )


class Harness:
    """A running system actor and the outbox relay, on one transport and store."""

    def __init__(
        self,
        rt: Runtime,
        transport: Transport,
        store: Store,
        gateway: SystemGateway,
        system: ActorSystem,
    ) -> None:
        self.rt = rt
        self.transport = transport
        self.store = store
        self.gateway = gateway
        self.system = system
        self.shutdown = anyio.Event()
        self.stopped = anyio.Event()

    async def send(self, *messages: OutgoingMessage) -> None:
        """Publish *messages*; all must be confirmed."""
        outcomes = await self.transport.publish(list(messages), timeout_s=5)
        assert set(outcomes) == {PublishOutcome.ACK}

    async def take(self, queue: str, n: int) -> list[Delivery]:
        """Consume and acknowledge *n* deliveries from *queue*."""
        sub = await self.transport.subscribe(queue, prefetch=100)
        got: list[Delivery] = []
        with anyio.fail_after(20):
            while len(got) < n:
                batch = await sub.batch(100)
                got.extend(batch)
                sub.ack(batch[-1].tag, multiple=True)
        await sub.close()
        return got

    async def results(self, n: int) -> list[Envelope]:
        """The envelopes of *n* results published to q2c.events."""
        deliveries = await self.take(OUT, n)
        return [msgspec.json.decode(d.body, type=Envelope) for d in deliveries]

    async def dead_letters(self, n: int) -> list[DeadLetterRow]:
        """Wait for at least *n* dead letters in the store."""

        async def enough() -> list[DeadLetterRow]:
            rows = await self.store.list_dead_letters(DeadLetterFilter())
            return rows if len(rows) >= n else []

        return await eventually(enough)

    async def stages(self, correlation_id: str, message_id: str) -> list[str]:
        """The journal stages of one message, in order."""
        rows = await self.store.journal(correlation_id)
        return [r.stage for r in rows if r.message_id == message_id]

    @property
    def memory(self) -> MemoryTransport:
        """The transport, which must be the in-process one."""
        assert isinstance(self.transport, MemoryTransport)
        return self.transport

    def depth(self, queue: str = QUEUE) -> int:
        """Messages in *queue*, ready or unacknowledged."""
        return self.memory.queue_depth(queue)

    def consumers(self, queue: str = QUEUE) -> list[dict[str, Any]]:
        """The subscriptions consuming *queue*."""
        subs = self.memory.status()["subscriptions"]
        return [s for s in subs if s["queue"] == queue]

    async def stop(self) -> None:
        """Shut the tree down and wait until it stopped."""
        self.shutdown.set()
        with anyio.fail_after(10):
            await self.stopped.wait()

    async def until(self, outcome: str, n: int = 1, timeout_s: float = 10) -> None:
        """Wait until *n* commands had *outcome* (committed and acknowledged)."""

        async def reached() -> bool:
            return self.gateway.commands.get(outcome, 0) >= n

        await eventually(reached, timeout_s=timeout_s)


@asynccontextmanager
async def serve(rt: Runtime, gateway: SystemGateway) -> AsyncIterator[Harness]:
    """Run the relay and *gateway*'s actor on *rt*'s (attached) store and transport."""
    cfg = rt.cfg
    store, transport = rt.store, rt.transport
    relay = ChildSpec(
        id="relay",
        start=lambda: OutboxRelay(
            store=store,
            transport=transport,
            feed=rt.feed,
            core=cfg.core,
            publish_timeout_s=5,
            metrics=rt.metrics,
            crash=rt.crash,
        ),
    )
    root = SupervisorSpec(
        id="root", strategy=Strategy.REST_FOR_ONE, children=[relay, gateway.spec()]
    )
    system = ActorSystem()
    h = Harness(rt, transport, store, gateway, system)
    started = anyio.Event()

    async def run() -> None:
        try:
            await system.run(root, started=started, shutdown=h.shutdown)
        finally:
            h.stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            await started.wait()
        try:
            yield h
        finally:
            h.shutdown.set()


@asynccontextmanager
async def running(
    connector: FakeErp,
    settings: GatewaySettings | None = None,
    *,
    fake: FakeTime | None = None,
    store: Store | None = None,
    cfg: Config | None = None,
) -> AsyncIterator[Harness]:
    """*connector*'s system actor on the in-process transport and SQLite in memory."""
    cfg = cfg or config()
    rt = Runtime(cfg)
    topology = build_topology(cfg.topology, rt.routes())
    clock = fake.clock if fake is not None else monotonic
    transport = MemoryTransport(topology, clock=clock)
    sqlite = await SqliteStore.open(":memory:")
    rt.attach(store=store or sqlite, transport=transport)
    gateway = SystemGateway(
        rt,
        connector,
        settings or GatewaySettings(rate_per_s=1000, burst=100),
        clock=clock,
        sleep=fake.sleep if fake is not None else anyio.sleep,
        rand=lambda: 0.0,
    )
    connector.gateway = gateway
    try:
        async with serve(rt, gateway) as h:
            yield h
    finally:
        rt.feed.close()
        await transport.aclose()
        await sqlite.aclose()


async def test_a_command_is_carried_out_and_its_result_published() -> None:
    """Success: one call, the result on q2c.events, the delivery acknowledged."""
    erp = FakeErp()
    msg = command("o-1")
    async with running(erp) as h:
        await h.send(msg)
        (result,) = await h.results(1)
        await h.until("completed")
        # The system actor answers an ask with its status dict.
        status = cast(dict[str, Any], await h.system.lookup("sys.erp").ask(None))
        depth = h.depth()
        stages = await h.stages("deal-o-1", msg.message_id)

    key = "deal:o-1/erp.create"
    assert erp.keys == [key]
    assert erp.firsts == [True]  # nothing before it can have reached the system
    assert result.type == "test.order.created"
    assert result.idempotency_key == f"{key}/test.order.created/0"
    assert result.id == message_id_for(result.idempotency_key)
    assert (result.correlation_id, result.causation_id) == ("deal-o-1", "cmd-o-1")
    assert (result.traceparent, result.subject) == (TRACEPARENT, "order/o-1")
    assert msgspec.json.decode(result.data, type=OrderCreated).erp_id == "erp-1"
    assert depth == 0  # acknowledged: nothing ready, nothing unacked
    assert stages == ["completed"]
    assert status["commands"] == {"completed": 1}
    assert status["calls"] == {"ok": 1}
    assert status["breaker"]["state"] == "closed"


async def test_a_completed_command_is_not_sent_to_the_system_again() -> None:
    """Duplicates, in one batch and later, are acknowledged without a call."""
    erp = FakeErp()
    first = command("o-1")
    again = command("o-1", message_id="cmd-o-1-resent")  # same key, new message
    async with running(erp) as h:
        await h.send(first, again)
        await h.results(1)
        await h.until("duplicate")
        await h.send(command("o-1", message_id="cmd-o-1-third"))
        await h.until("duplicate", 2)
        depth, out = h.depth(), h.depth(OUT)
        duplicates = h.rt.metrics.snapshot()["messages_duplicate"]

    assert erp.keys == ["deal:o-1/erp.create"]
    assert (depth, out) == (0, 0)
    assert duplicates == 2


async def test_a_transient_failure_goes_through_a_retry_tier_then_succeeds() -> None:
    """Unavailable once: retried via q2c.retry.*, same key, then completed."""
    erp = FakeErp()
    msg = command("o-1", fail_times=1)
    async with running(erp) as h:
        await h.send(msg)
        (result,) = await h.results(1)
        await h.until("completed")
        stages = await h.stages("deal-o-1", msg.message_id)
        journal = await h.store.journal("deal-o-1")

    assert erp.keys == ["deal:o-1/erp.create"] * 2
    assert erp.firsts == [True, False]  # back from a tier: it may have landed
    assert stages == ["retry_scheduled", "completed"]
    assert "retry in 0.05s" in journal[0].detail
    assert result.causation_id == msg.message_id


async def test_retry_after_chooses_a_tier_at_least_that_long() -> None:
    """A 429 asking for 0.08 s skips the 0.05 s tier for the 0.1 s one."""
    erp = FakeErp()
    async with running(erp) as h:
        await h.send(command("o-1", fail_times=1, retry_after_s=0.08))
        await h.results(1)
        journal = await h.store.journal("deal-o-1")

    assert journal[0].stage == "retry_scheduled"
    assert "retry in 0.1s" in journal[0].detail


async def test_a_call_that_never_answers_times_out_and_is_retried() -> None:
    """A hung call ends at call_timeout_s and counts as unavailable."""
    erp = FakeErp()
    settings = GatewaySettings(rate_per_s=1000, burst=100, call_timeout_s=0.05)
    async with running(erp, settings) as h:
        await h.send(command("o-1", hang_times=1))
        await h.results(1)
        calls = dict(h.gateway.calls)

    assert calls == {"timeout": 1, "ok": 1}
    assert len(erp.keys) == 2


async def test_exhausted_attempts_dead_letter_the_command() -> None:
    """A command failing itself on every attempt: max_attempts calls, then a letter."""
    erp = FakeErp()
    msg = command("o-1", bug=True)
    settings = GatewaySettings(rate_per_s=1000, burst=100, breaker_failures=10)
    async with running(erp, settings) as h:
        await h.send(msg)
        (row,) = await h.dead_letters(1)
        (copy,) = await h.take("q2c.dead", 1)
        stages = await h.stages("deal-o-1", msg.message_id)

    assert len(erp.keys) == 3
    assert (row.reason, row.attempts, row.body) == ("attempts_exhausted", 3, msg.body)
    assert "no mapping for order o-1" in row.detail
    assert copy.body == msg.body
    assert stages == ["retry_scheduled", "retry_scheduled", "dead_lettered"]


async def test_an_unavailable_system_uses_up_time_not_attempts() -> None:
    """Unavailable past max_attempts: still retried, until unavailable-max-s.

    The mark of the first such failure travels with the message; once the
    run of failures is older than the limit, the command is dead-lettered.
    """
    erp = FakeErp()
    msg = command("o-1", fail_times=99)
    settings = GatewaySettings(rate_per_s=1000, burst=100, breaker_failures=100)
    # Long enough for several calls past max_attempts even on a loaded machine.
    cfg = config(BROKER__CORE__UNAVAILABLE_MAX_S="3")
    async with running(erp, settings, cfg=cfg) as h:
        await h.send(msg)
        (row,) = await h.dead_letters(1)
        stages = await h.stages("deal-o-1", msg.message_id)

    assert len(erp.keys) > 3  # max_attempts is 3
    assert (row.reason, row.body) == ("unavailable_too_long", msg.body)
    assert "busy" in row.detail
    assert stages[-1] == "dead_lettered"
    assert set(stages[:-1]) == {"retry_scheduled"}


async def test_a_command_waiting_on_a_lock_past_max_attempts_still_completes() -> None:
    """RetryLater spends time, not attempts: lock contention loses no command."""
    erp = FakeErp()
    settings = GatewaySettings(rate_per_s=1000, burst=100, breaker_failures=2)
    async with running(erp, settings) as h:
        await h.send(command("o-1", defer_times=5))
        await h.results(1)
        calls = dict(h.gateway.calls)
        dead = await h.store.list_dead_letters(DeadLetterFilter())

    assert calls == {"deferred": 5, "ok": 1}  # max_attempts is 3
    assert dead == []
    assert len(erp.effects) == 1


async def test_a_rejected_command_is_dead_lettered_at_once_with_the_reason() -> None:
    """UpstreamRejected: one call, a dead letter naming the refusal, no retry."""
    erp = FakeErp()
    msg = command("o-1", reject=True)
    async with running(erp) as h:
        await h.send(msg)
        (row,) = await h.dead_letters(1)
        await h.until("dead_lettered")
        failures = h.gateway.breaker.consecutive_failures

    assert len(erp.keys) == 1
    assert (row.reason, row.attempts, row.body) == ("rejected", 1, msg.body)
    assert "customer 42 is blocked" in row.detail
    assert row.correlation_id == "deal-o-1"
    assert failures == 0  # the system answered: not a failure for the breaker


async def test_a_replayed_dead_letter_is_not_called_a_first_attempt() -> None:
    """An operator's replay may repeat a call that reached the system."""
    erp = FakeErp()
    async with running(erp) as h:
        await h.send(command("o-1", reject=True))
        await h.dead_letters(1)
        await h.until("dead_lettered")
        replayed = await h.store.replay_dead_letters(
            DeadLetterFilter(reason="rejected"), max_replays=1, dry_run=False
        )
        await h.until("dead_lettered", 2)

    assert len(replayed) == 1
    assert erp.firsts == [True, False]


def _bad_bodies() -> list[tuple[bytes, str]]:
    good = command("o-1").body
    return [
        (b"{nope", "malformed"),
        (b"x" * 5000, "oversize"),
        (good.replace(b'"test.order.create"', b'"test.order.burn"', 1), "unknown_type"),
        (good.replace(b'"order_id":"o-1"', b'"order_id":1'), "schema_invalid"),
    ]


@pytest.mark.parametrize(("body", "reason"), _bad_bodies())
async def test_bad_deliveries_are_dead_lettered_without_a_call(
    body: bytes, reason: str
) -> None:
    """Malformed, oversize, unknown or invalid: dead letter with the bytes, acked."""
    erp = FakeErp()
    async with running(erp) as h:
        await h.send(raw(body, message_id="bad-1"))
        (row,) = await h.dead_letters(1)
        (copy,) = await h.take("q2c.dead", 1)
        await h.until("dead_lettered")
        depth = h.depth()

    assert erp.calls == []
    assert (row.reason, row.body, row.message_id) == (reason, body, "bad-1")
    assert copy.body == body
    assert copy.headers is not None
    assert copy.headers["x-q2c-reason"] == reason
    assert depth == 0


async def test_calls_in_flight_never_exceed_the_concurrency_cap() -> None:
    """Ten commands, concurrency 3: three calls at a time, never a fourth."""
    erp = FakeErp()
    erp.gate = anyio.Event()
    settings = GatewaySettings(rate_per_s=1000, burst=100, concurrency=3, prefetch=10)
    async with running(erp, settings) as h:
        await h.send(*(command(f"o-{n}") for n in range(10)))
        await erp.journal.wait_for("call", 3)

        async def all_taken() -> bool:
            return h.gateway.held == 10

        await eventually(all_taken)
        await anyio.wait_all_tasks_blocked()
        held_back = (erp.max_in_flight, h.gateway.in_flight, len(erp.calls))
        erp.gate.set()
        await h.results(10)

    assert held_back == (3, 3, 3)
    assert erp.max_in_flight == 3
    assert sorted(erp.keys) == sorted(f"deal:o-{n}/erp.create" for n in range(10))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-daemon"])
async def test_the_token_bucket_spaces_out_call_starts(shared: bool) -> None:
    """Burst 2 at 2/s: two calls at t=0, then one per half second of fake time.

    Shared, the bucket is the store's, on the store's clock (here the same
    fake one); per daemon, it is the gateway's own.
    """
    time = FakeTime()
    erp = FakeErp(time)
    settings = GatewaySettings(
        rate_per_s=2, burst=2, concurrency=6, prefetch=6, shared_rate=shared
    )
    store = await SqliteStore.open(":memory:", clock=time.clock)
    try:
        await _spaced_out(erp, settings, time, store, shared)
    finally:
        await store.aclose()
    assert [at for _, _, at in erp.calls] == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]


async def _spaced_out(
    erp: FakeErp, settings: GatewaySettings, time: FakeTime, store: Store, shared: bool
) -> None:
    async with running(erp, settings, fake=time, store=store) as h:
        await h.send(*(command(f"o-{n}") for n in range(6)))

        async def settled(calls: int) -> None:
            await erp.journal.wait_for("call", calls)

            async def waiting_for_a_token() -> bool:
                return time.sleeping == 1 and h.gateway.held >= 6 - calls

            await eventually(waiting_for_a_token)
            await anyio.wait_all_tasks_blocked()
            assert len(erp.calls) == calls  # no call starts without a token

        await settled(2)
        for step, calls in ((0.5, 3), (0.5, 4)):
            time.advance(step)
            await settled(calls)
        time.advance(1.0)  # two tokens' worth: both remaining calls start
        await h.results(6)

        assert h.gateway.status()["rate_shared"] is shared


async def test_two_daemons_on_one_store_share_the_rate() -> None:
    """Burst 3 at 2/s across two daemons: three calls at t=0 between them, not six."""
    time = FakeTime()
    erps = (FakeErp(time), FakeErp(time))
    settings = GatewaySettings(rate_per_s=2, burst=3, concurrency=4, prefetch=4)
    store = await SqliteStore.open(":memory:", clock=time.clock)

    def started() -> int:
        return sum(len(erp.calls) for erp in erps)

    async def both_waiting_for_a_token() -> bool:
        return time.sleeping == 2

    try:
        async with (
            running(erps[0], settings, fake=time, store=store) as one,
            running(erps[1], settings, fake=time, store=store) as two,
        ):
            await one.send(*(command(f"a-{n}") for n in range(4)))
            await two.send(*(command(f"b-{n}") for n in range(4)))
            await eventually(both_waiting_for_a_token)
            await anyio.wait_all_tasks_blocked()
            assert started() == 3
            time.advance(0.5)  # one token's worth, for whichever asks first
            await eventually(both_waiting_for_a_token)
            await anyio.wait_all_tasks_blocked()
            assert started() == 4
            for _ in range(8):  # the other four, a token per half second
                time.advance(0.5)
                await anyio.wait_all_tasks_blocked()
            await one.results(4)
            await two.results(4)
    finally:
        await store.aclose()
    assert started() == 8


def sample(h: Harness, name: str, **labels: str) -> float | None:
    """One metric's value for the erp system."""
    return h.rt.metrics.registry.get_sample_value(name, {"system": "erp", **labels})


def breaker_settings() -> GatewaySettings:
    return GatewaySettings(
        rate_per_s=1000,
        burst=100,
        concurrency=1,
        prefetch=4,
        breaker_failures=3,
        breaker_reset_s=10,
        breaker_reset_max_s=40,
    )


async def open_the_breaker(h: Harness, erp: FakeErp) -> None:
    """Six commands during an outage: three failures open the breaker."""
    erp.outage = True
    await h.send(*(command(f"o-{n}") for n in range(6)))

    async def cancelled() -> bool:
        breaker = h.gateway.breaker
        return breaker.state is BreakerState.OPEN and not h.consumers()

    await eventually(cancelled)


async def test_the_breaker_cancels_the_consumer_and_a_good_probe_recovers() -> None:
    """Open: no consumer, messages wait in the queue; one probe closes it again."""
    time = FakeTime()
    erp = FakeErp(time)
    async with running(erp, breaker_settings(), fake=time) as h:
        await open_the_breaker(h, erp)
        await anyio.wait_all_tasks_blocked()
        open_status = h.gateway.status()
        waiting = h.depth()
        calls_while_open = len(erp.calls)
        gauge_while_open = sample(h, "q2c_gateway_breaker_state")

        erp.outage = False
        time.advance(10)
        results = await h.results(6)
        await h.until("completed", 6)
        consumers = h.consumers()
        gauge_after = sample(h, "q2c_gateway_breaker_state")
        opened = sample(h, "q2c_gateway_breaker_opened_total")
        failed_calls = sample(h, "q2c_gateway_calls_total", outcome="unavailable")

    assert calls_while_open == 3
    assert waiting == 3  # the three never called wait in q2c.sys.erp
    assert open_status["consuming"] is False
    assert open_status["breaker"]["state"] == "open"
    assert open_status["commands"]["returned"] >= 1  # taken, then given back
    states = [state for _, state, _ in erp.calls]
    assert states == ["closed"] * 3 + ["half_open"] + ["closed"] * 5
    assert len(results) == 6
    assert len(consumers) == 1
    assert h.gateway.breaker.opened == 1
    assert (gauge_while_open, gauge_after, opened, failed_calls) == (2, 0, 1, 3)


async def test_a_long_outage_is_waited_out_not_dead_lettered() -> None:
    """Forty half-open periods of outage, far past max_attempts: nothing is lost.

    Each failed probe and each retry used to spend one of the command's
    attempts; with the breaker open for most of an outage, a long one
    dead-lettered every command caught in it.
    """
    time = FakeTime()
    erp = FakeErp(time)
    async with running(erp, breaker_settings(), fake=time) as h:
        await open_the_breaker(h, erp)
        for _ in range(40):
            time.advance(41)
            await anyio.wait_all_tasks_blocked()
        probes = [state for _, state, _ in erp.calls].count("half_open")
        during = dict(h.gateway.commands)
        erp.outage = False
        for _ in range(40):
            if h.gateway.commands.get("completed", 0) >= 6:
                break
            time.advance(41)
            await anyio.wait_all_tasks_blocked()
        results = await h.results(6)

    assert probes > 3  # max_attempts is 3
    assert during.get("dead_lettered", 0) == 0
    assert sorted(r.subject or "" for r in results) == [
        f"order/o-{n}" for n in range(6)
    ]


async def test_a_failed_probe_opens_the_breaker_again_for_longer() -> None:
    """Half-open lets exactly one call through; its failure doubles the wait."""
    time = FakeTime()
    erp = FakeErp(time)
    async with running(erp, breaker_settings(), fake=time) as h:
        await open_the_breaker(h, erp)
        time.advance(10)

        async def reopened() -> bool:
            return h.gateway.breaker.opened == 2 and not h.consumers()

        await eventually(reopened)
        after_probe = (len(erp.calls), h.gateway.breaker.reset_s)
        time.advance(10)  # half of the new open time: still open
        await anyio.wait_all_tasks_blocked()
        still_open = (len(erp.calls), h.gateway.breaker.state, h.consumers())

        erp.outage = False
        time.advance(10)
        await h.results(6)

    assert after_probe == (4, 20.0)
    assert still_open == (4, BreakerState.OPEN, [])
    states = [state for _, state, _ in erp.calls]
    assert states[:5] == ["closed"] * 3 + ["half_open"] * 2
    assert states.count("half_open") == 2  # one probe per half-open period


async def test_a_stop_lets_the_call_in_flight_finish_and_gives_back_the_rest() -> None:
    """Graceful stop: the call in flight is committed and acked; the rest wait."""
    erp = FakeErp()
    erp.gate = anyio.Event()
    settings = GatewaySettings(rate_per_s=1000, burst=100, concurrency=1, prefetch=3)
    async with running(erp, settings) as h:
        await h.send(*(command(f"o-{n}") for n in range(3)))
        await erp.journal.wait_for("call")
        h.shutdown.set()
        await anyio.wait_all_tasks_blocked()
        erp.gate.set()
        await h.stop()
        stages = await h.stages("deal-o-0", "cmd-o-0")
        waiting, published = h.depth(), h.depth(OUT)

    assert len(erp.calls) == 1
    assert stages == ["completed"]
    assert (waiting, published) == (2, 1)
    assert h.gateway.commands == {"completed": 1, "returned": 2}


async def test_a_call_still_running_at_the_stop_deadline_is_given_back() -> None:
    """A call that outlives the shutdown grace is cut short and not acknowledged."""
    erp = FakeErp()
    erp.gate = anyio.Event()  # never opens
    async with running(erp, cfg=config(BROKER__DAEMON__SHUTDOWN_S="0.2")) as h:
        await h.send(command("o-1"))
        await erp.journal.wait_for("call")
        await h.stop()
        waiting = h.depth()
        journal = await h.store.journal("deal-o-1")

    assert waiting == 1  # back in the queue, for the next daemon
    assert journal == []
    assert h.gateway.in_flight == 0


class CompetingStore:
    """SQLite, except that another consumer claims the first key we commit."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.raced = False

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """As SQLite does."""
        return await self.inner.prepare_batch(consumer, keys, workflow, correlation_ids)

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Let the other consumer claim the keys first, once."""
        if write.keys and not self.raced:
            self.raced = True
            await self.inner.commit_batch(
                BatchWrite(
                    consumer=write.consumer, workflow=write.workflow, keys=write.keys
                )
            )
        return await self.inner.commit_batch(write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_key_claimed_by_another_daemon_meanwhile_becomes_a_duplicate() -> None:
    """A commit conflict re-reads the inbox; the other daemon's commit counts."""
    erp = FakeErp()
    sqlite = await SqliteStore.open(":memory:")
    store = CompetingStore(sqlite)
    try:
        # The protocol's other methods are reached through __getattr__.
        async with running(erp, store=cast(Store, store)) as h:
            await h.send(command("o-1"))
            await h.until("duplicate")
            published = h.depth(OUT)
            restarts = h.system.tree()["children"][1]["restarts"]
    finally:
        await sqlite.aclose()

    assert store.raced
    assert len(erp.calls) == 1
    assert published == 0  # the other daemon published the result, not us
    assert restarts == 0


class CrashingStore(CompetingStore):
    """SQLite, except that the first commit fails with a bug."""

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Crash the writer once, after the call and before anything is written."""
        if not self.raced:
            self.raced = True
            raise RuntimeError("disk on fire")
        return await self.inner.commit_batch(write)


async def test_a_crash_between_call_and_commit_calls_again_with_the_same_key() -> None:
    """The actor crashes, the command comes back, same key, one effect, same ids."""
    erp = FakeErp()
    sqlite = await SqliteStore.open(":memory:")
    store = CrashingStore(sqlite)
    try:
        with capture_logs() as logs:
            # The protocol's other methods are reached through __getattr__.
            async with running(erp, store=cast(Store, store)) as h:
                await h.send(command("o-1"))
                (result,) = await h.results(1)
                await h.until("completed")
                restarts = h.system.tree()["children"][1]["restarts"]
    finally:
        await sqlite.aclose()

    assert erp.keys == ["deal:o-1/erp.create"] * 2
    assert erp.firsts == [True, False]  # redelivered after the crash
    assert erp.effects == {"deal:o-1/erp.create": "erp-1"}
    assert result.id == message_id_for("deal:o-1/erp.create/test.order.created/0")
    assert restarts == 1
    crashes = [e for e in logs if e["event"] == "actor_crashed"]
    assert [type(e["exc_info"]).__name__ for e in crashes] == ["RuntimeError"]


async def test_one_log_line_per_command_outcome() -> None:
    """command_handled names the system, type, correlation, outcome and duration."""
    erp = FakeErp()
    with capture_logs() as logs:
        async with running(erp) as h:
            await h.send(command("o-1"), command("o-2", reject=True))
            await h.until("completed")
            await h.until("dead_lettered")

    handled = sorted(
        (e for e in logs if e["event"] == "command_handled"),
        key=lambda e: str(e["correlation_id"]),
    )
    assert [(e["correlation_id"], e["outcome"]) for e in handled] == [
        ("deal-o-1", "completed"),
        ("deal-o-2", "dead_lettered"),
    ]
    for e in handled:
        assert (e["system"], e["type"]) == ("erp", "test.order.create")
        assert isinstance(e["duration_ms"], float)


def test_a_system_without_a_declared_queue_is_a_config_error() -> None:
    """The builder refuses a connector whose queue the topology does not declare."""
    rt = Runtime(config(BROKER__TOPOLOGY__SYSTEMS="[]"))
    rt.feed.close()

    with pytest.raises(ConfigError, match=r"q2c\.sys\.erp"):
        system_actor_spec(rt, FakeErp(), GatewaySettings())


def test_settings_read_from_a_kebab_case_table() -> None:
    """[systems.<name>] keys are kebab-case; unknown keys and bad values fail."""
    table = {"rate-per-s": 5, "burst": 3, "breaker-reset-s": 2.5}
    settings = msgspec.convert(table, GatewaySettings)
    rt = Runtime(config())
    rt.feed.close()
    spec = system_actor_spec(rt, FakeErp(), settings)

    assert (settings.rate_per_s, settings.burst, settings.prefetch) == (5, 3, 8)
    assert (spec.id, spec.shutdown_s) == ("sys.erp", 5.0)
    with pytest.raises(msgspec.ValidationError, match="rate-per-sec"):
        msgspec.convert({"rate-per-sec": 5}, GatewaySettings)
    with pytest.raises(msgspec.ValidationError, match="breaker-reset-max-s"):
        msgspec.convert({"breaker-reset-s": 600}, GatewaySettings)


async def test_a_connector_waiting_on_a_lock_does_not_open_the_breaker() -> None:
    """RetryLater (another daemon holds the key) is no failure of the system.

    Counted as one, lock contention could open SAP's breaker and stop every
    SAP command behind it.
    """
    erp = FakeErp()
    settings = GatewaySettings(rate_per_s=1000, burst=100, breaker_failures=2)
    async with running(erp, settings) as h:
        await h.send(*(command(f"o-{n}", defer_times=1) for n in range(4)))
        await h.results(4)
        calls = dict(h.gateway.calls)
        opened = h.gateway.breaker.opened

    assert calls == {"deferred": 4, "ok": 4}
    assert opened == 0
