"""``brokerd demo``: the daemon's main job, end to end, on its configured services.

On the embedded default (in-process transport, SQLite) it needs nothing but
the installed package. It starts a daemon in this process, posts ledger
entries to ``q2c.events`` (with duplicates and a few hostile messages mixed
in), reads every ``ledger.entry.applied`` that comes out, and ends with a
report and a check: each account's balance equals the sum of its distinct
entries, each entry was applied once, and each bad message is a dead letter.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from decimal import Decimal
from typing import Any

import anyio
import msgspec

from actors.ledger import LedgerState
from broker import Config, Daemon
from broker.codec import encode_envelope, encode_event, utcnow
from broker.transport import OutgoingMessage, PublishOutcome
from canonical import Envelope, LedgerEntryApplied, LedgerEntryPosted
from canonical.upcast import current_version

__all__ = ["run_demo", "entry_message"]

OUTPUT_QUEUE = "q2c.events.ledger-applied"


def entry_message(
    account: str, entry_id: str, amount: Decimal, *, memo: str = ""
) -> OutgoingMessage:
    """The AMQP message a producer publishes for one ledger entry."""
    key = f"ledger:{entry_id}"
    env = Envelope(
        id=f"demo-{entry_id}",
        source="/demo/ledger",
        type="ledger.entry.posted",
        schema_version=current_version("ledger.entry.posted"),
        time=utcnow(),
        correlation_id=account,
        idempotency_key=key,
        data=encode_event(
            LedgerEntryPosted(
                account=account, entry_id=entry_id, amount=amount, memo=memo
            )
        ),
    )
    return OutgoingMessage(
        exchange="q2c.events",
        routing_key="ledger.entry.posted",
        body=encode_envelope(env),
        message_id=env.id,
        correlation_id=account,
        type=env.type,
    )


def _hostile() -> list[OutgoingMessage]:
    def raw(
        name: str, body: bytes, type_: str = "ledger.entry.posted"
    ) -> OutgoingMessage:
        return OutgoingMessage(
            exchange="q2c.events",
            routing_key="ledger.entry.posted",
            body=body,
            message_id=f"demo-bad-{name}",
            correlation_id="acct-bad",
            type=type_,
        )

    good = entry_message("acct-bad", "bad-1", Decimal("1")).body
    return [
        raw("not-json", b"{this is not json"),
        raw("duplicate-keys", good.replace(b'"id":', b'"id":"x","id":', 1)),
        raw("schema", good.replace(b'"amount":"1"', b'"amount":"NaN"')),
    ]


def _demo_config(cfg: Config) -> Config:
    topology = msgspec.structs.replace(
        cfg.topology,
        event_queues={
            **cfg.topology.event_queues,
            OUTPUT_QUEUE: ("ledger.entry.applied",),
        },
    )
    sqlite = msgspec.structs.replace(cfg.sqlite, path="var/demo/q2c.sqlite3")
    memory = msgspec.structs.replace(cfg.memory, journal="var/demo/q2c.queues.sqlite3")
    control = msgspec.structs.replace(cfg.control, socket_path="var/demo/brokerd.sock")
    return msgspec.structs.replace(
        cfg, topology=topology, sqlite=sqlite, memory=memory, control=control
    )


async def run_demo(
    cfg: Config, *, entries: int = 20_000, accounts: int = 200, deals: int = 0
) -> int:
    """Run the demo; return 0 when every check passed (*deals* is the q2c demo's)."""
    del deals
    cfg = _demo_config(cfg)
    if cfg.daemon.store == "sqlite" or cfg.daemon.transport == "memory":
        # A fresh run: no store or queue journal of an earlier one.
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree("var/demo", ignore_errors=True)
        )
    await anyio.Path("var/demo").mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    expected: dict[str, Decimal] = {}
    counts: dict[str, int] = {}
    messages: list[OutgoingMessage] = []
    for n in range(entries):
        account = f"acct-{rng.randrange(accounts):04d}"
        amount = Decimal(rng.randrange(-50_000, 100_000)) / 100
        expected[account] = expected.get(account, Decimal(0)) + amount
        counts[account] = counts.get(account, 0) + 1
        messages.append(entry_message(account, f"e{n:07d}", amount))
    duplicates = rng.sample(messages, entries // 10)
    stream = messages + duplicates
    rng.shuffle(stream)
    hostile = _hostile()
    stream[len(stream) // 2 : len(stream) // 2] = hostile

    daemon = Daemon(cfg)
    report: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(60):
            await daemon.started.wait()
        transport = daemon.runtime.transport
        applied: set[str] = set()
        started = time.perf_counter()
        _say(
            f"posting {len(stream)} messages ({len(duplicates)} duplicates, "
            f"{len(hostile)} hostile) to q2c.events on {cfg.daemon.transport}/"
            f"{cfg.daemon.store}"
        )
        sub = await transport.subscribe(OUTPUT_QUEUE, prefetch=2000)
        async with anyio.create_task_group() as inner:

            async def publish() -> None:
                for i in range(0, len(stream), 500):
                    chunk = stream[i : i + 500]
                    outcomes = await transport.publish(chunk, timeout_s=30)
                    if any(o is not PublishOutcome.ACK for o in outcomes):
                        raise RuntimeError(f"publish failed: {set(outcomes)}")

            inner.start_soon(publish)
            decoder = msgspec.json.Decoder(Envelope)
            event_decoder = msgspec.json.Decoder(LedgerEntryApplied)
            with anyio.fail_after(max(120, entries / 100)):
                while len(applied) < entries:
                    batch = await sub.batch(2000)
                    for d in batch:
                        applied.add(
                            event_decoder.decode(decoder.decode(d.body).data).entry_id
                        )
                    sub.ack(batch[-1].tag, multiple=True)
                    _progress(len(applied), entries)
        elapsed = time.perf_counter() - started
        await sub.close()
        _say("")

        store = daemon.runtime.store
        state_decoder = msgspec.json.Decoder(LedgerState)
        wrong = 0
        for account, total in expected.items():
            rec = await store.load_saga("ledger", account)
            state = state_decoder.decode(rec.state) if rec else LedgerState()
            if state.balance != total or state.entries != counts[account]:
                wrong += 1
        with anyio.fail_after(30):
            # Bounded poll: the store has no change feed to wait on.
            while (await store.counts())["dead_letters"] < len(hostile):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        counters = daemon.runtime.metrics.snapshot()
        report = {
            "entries": entries,
            "accounts": len(expected),
            "duplicates_published": len(duplicates),
            "duplicates_suppressed": counters.get("messages_duplicate", 0),
            "applied": len(applied),
            "dead_letters": (await store.counts())["dead_letters"],
            "accounts_wrong": wrong,
            "seconds": round(elapsed, 2),
            "msg_s": round(len(stream) / elapsed),
        }
        daemon.request_shutdown("demo finished")

    ok = (
        report["accounts_wrong"] == 0
        and report["applied"] == entries
        and report["dead_letters"] == len(hostile)
        and report["duplicates_suppressed"] >= len(duplicates)
    )
    _say("\nQ2C Broker demo: ledger")
    for key, value in report.items():
        _say(f"  {key:<22} {value}")
    _say(
        f"  {'check':<22} {'PASS' if ok else 'FAIL'}: "
        "balances = sum of distinct entries, each applied once, "
        "every hostile message dead-lettered"
    )
    return 0 if ok else 1


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _progress(done: int, total: int) -> None:
    if sys.stdout.isatty() or os.environ.get("Q2C_PROGRESS"):
        print(f"\r  applied {done}/{total}", end="", flush=True)
