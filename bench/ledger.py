"""The engine benchmark: the ledger workload through three pipelines, side by side.

``python -m bench.ledger --messages N`` runs, one after the other in this
process, against the local RabbitMQ and Postgres, each on a fresh vhost and
a fresh database:

* **engine**: ``python -m broker run`` (AMQP transport, Postgres store);
* **naive**: `bench.naive`, per-message aio-pika + asyncpg;
* **passthrough**: `bench.passthrough`, consume → publish, no database.

Each variant runs as a child process and is measured twice. *Drain*: the N
messages (a tenth of them duplicates) are published before the child starts;
the clock starts when its consumers take the first deliveries (passive
declares see the ready count drop) and stops when the last distinct output
arrives. *Latency*: with the child running, messages are published at
``--rate`` (default: half the drain rate) for ``--latency-s``; each output's
latency is its arrival time minus the publish time carried in its entry id.
CPU seconds of the child, RabbitMQ, Postgres (the database's backends plus
the WAL writer, checkpointer and background writer) and this process are
taken over the drain window. Afterwards the child gets SIGTERM and must exit
0, and Postgres must hold exactly the expected balances.

``--rss`` measures the engine alone: M messages backlogged (default one
million), then the daemon's peak RSS while it drains them, sampled every
second. The last line of the output is always one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import msgspec
import psutil

from bench.harness import (
    MANAGEMENT_URL,
    PG_ADMIN_DSN,
    Child,
    CpuMeter,
    Env,
    Services,
    Variant,
    compare_balances,
    deadline,
    run_command,
    say,
)
from bench.naive import NaiveVariant
from bench.passthrough import PassthroughVariant
from bench.workload import (
    OUTPUT_QUEUE,
    BenchError,
    Expected,
    OutputCounter,
    Tally,
    Workload,
    counting,
    merge_expected,
    publish_backlog,
    publish_paced,
    ready_count,
)
from broker.errors import BrokerError
from broker.transport.channel import WireChannel
from broker.transport.wire import WireConnection

__all__ = ["VARIANTS", "RSS_LIMIT_MB", "EngineVariant", "main"]

VARIANTS = ("engine", "naive", "passthrough")
RSS_LIMIT_MB = 200
_SHARDS = 4
_POLL_S = 0.01
_ENGINE_CONFIG = """\
[daemon]
name = "q2c-bench"
transport = "amqp"
store = "postgres"
[amqp]
url = {amqp_url}
management-url = {management_url}
[postgres]
dsn = {dsn}
[sqlite]
path = {sqlite}
[topology]
shards = {shards}
[topology.event-queues]
{output_queue} = ["ledger.entry.applied"]
[control]
socket-path = {socket}
[http]
port = 0
[logging]
level = "warning"
format = "json"
"""


class EngineVariant:
    """The daemon, ``python -m broker run``, on AMQP and Postgres."""

    name = "engine"
    input_queues: tuple[str, ...] = tuple(f"q2c.wf.ledger.{n}" for n in range(_SHARDS))
    passes_duplicates = False
    needs_database = True

    def config(self, env: Env) -> Path:
        """Write the daemon's config file for *env*; return its path."""
        path = env.workdir / "broker.toml"
        q = json.dumps  # a JSON string is a valid TOML basic string
        path.write_text(
            _ENGINE_CONFIG.format(
                amqp_url=q(env.amqp_url),
                management_url=q(MANAGEMENT_URL),
                dsn=q(env.dsn),
                sqlite=q(str(env.workdir / "q2c.sqlite3")),
                shards=_SHARDS,
                output_queue=q(OUTPUT_QUEUE),
                socket=q(str(env.workdir / "brokerd.sock")),
            ),
            encoding="utf-8",
        )
        return path

    def _broker(self, env: Env, command: str) -> list[str]:
        config = str(self.config(env))
        return [sys.executable, "-m", "broker", "--config", config, command]

    async def prepare(self, env: Env) -> None:
        """``brokerd migrate`` and ``brokerd topology``."""
        log = env.workdir / "setup.log"
        await run_command("brokerd migrate", self._broker(env, "migrate"), log, 120)
        await run_command("brokerd topology", self._broker(env, "topology"), log, 120)

    def command(self, env: Env) -> list[str]:
        """``python -m broker --config FILE run``."""
        return self._broker(env, "run")

    async def verify(self, env: Env, expected: Expected) -> list[str]:
        """Saga balances, inbox keys and dead letters."""
        conn = await asyncpg.connect(env.dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT correlation_id, state FROM saga WHERE workflow = 'ledger'"
            )
            inbox = await conn.fetchval("SELECT count(*) FROM inbox")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letter")
        finally:
            await conn.close()
        got: Expected = {}
        for row in rows:
            state = msgspec.json.decode(row["state"])
            got[row["correlation_id"]] = (
                Decimal(state["balance"]),
                int(state["entries"]),
            )
        problems = compare_balances(expected, got)
        distinct = sum(n for _, n in expected.values())
        if inbox != distinct:
            problems.append(f"inbox holds {inbox} keys, expected {distinct}")
        if dead:
            problems.append(f"{dead} dead letters")
        return problems


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The command line, as the phases use it."""

    messages: int
    accounts: int
    duplicates: float
    rate: float | None
    latency_s: float
    warmup_s: float
    seed: int
    min_rate: float
    shutdown_s: float
    latency_trace: Path | None


@dataclass(frozen=True, kw_only=True)
class _Wiring:
    """One variant's services, connection and output counter."""

    variant: Variant
    env: Env
    conn: WireConnection
    publisher: WireChannel
    counter: OutputCounter
    meter: CpuMeter
    stack: AsyncExitStack


@asynccontextmanager
async def _wired(
    variant: Variant, services: Services, meter: CpuMeter
) -> AsyncIterator[_Wiring]:
    """Fresh services for *variant*, prepared, with a publishing channel."""
    async with AsyncExitStack() as stack:
        env = await services.open(
            variant.name, database=variant.needs_database, stack=stack
        )
        await variant.prepare(env)
        conn = await WireConnection.open(
            env.amqp_url, name="bench", heartbeat_s=30, connect_timeout_s=10
        )
        stack.push_async_callback(_close, conn)
        publisher = await conn.channel()
        await publisher.confirm_select(window=2048)
        yield _Wiring(
            variant=variant, env=env, conn=conn, publisher=publisher,
            counter=OutputCounter(),  # reads outputs once `counting` starts it
            meter=meter, stack=stack,
        )  # fmt: skip


async def _close(conn: WireConnection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.close()


def _tally(w: _Wiring, workload: Workload) -> Tally:
    dupes_out = w.variant.passes_duplicates
    return w.counter.expect(
        Tally(
            phase=workload.phase,
            distinct=workload.distinct,
            target=workload.messages if dupes_out else workload.distinct,
            count_all=dupes_out,
        )
    )


def _tally_problems(w: _Wiring, tally: Tally, workload: Workload) -> list[str]:
    problems = []
    if tally.new != workload.distinct:
        problems.append(
            f"{tally.phase}: {tally.new} distinct outputs of {workload.distinct}"
        )
    if tally.unknown:
        problems.append(f"{tally.phase}: {tally.unknown} outputs for unknown entries")
    if w.variant.passes_duplicates and tally.total != workload.messages:
        problems.append(f"{tally.phase}: {tally.total} outputs of {workload.messages}")
    return problems


async def _poll(
    channel: WireChannel, queues: Sequence[str], until: Callable[[int], bool]
) -> int:
    """The monotonic ns at which the ready count of *queues* satisfies *until*."""
    # Polled: nothing announces a consumer's first delivery or a queue's
    # filling. Bounded by the caller's deadline; a passive declare costs a
    # fraction of a millisecond, far less than consuming would.
    while not until(await ready_count(channel, queues)):  # noqa: ASYNC110
        await anyio.sleep(_POLL_S)
    return time.monotonic_ns()


async def _drain(
    w: _Wiring,
    s: Settings,
    *,
    phase: str = "d",
    read_back: bool = True,
    on_child: Callable[[Child], Awaitable[None]] | None = None,
) -> tuple[Child, Workload, Tally, dict[str, Any]]:
    """Publish a backlog, start the child, time it until the last output.

    The window runs from the first deliveries leaving the input queues to
    the output queue holding every expected output; nobody consumes the
    outputs meanwhile, so this process costs next to nothing while the
    child works. With *read_back*, the outputs are then read and checked
    entry by entry.
    """
    name = w.variant.name
    workload = Workload(
        phase=phase, messages=s.messages, accounts=s.accounts,
        duplicates=s.duplicates, seed=s.seed,
    )  # fmt: skip
    tally = _tally(w, workload)
    say(f"{name}: publishing {workload.messages} ({workload.distinct} distinct)")
    async with deadline(f"{name}: publishing the backlog", 60 + s.messages / 200):
        publish_s = await publish_backlog(w.publisher, workload)

    spawned = time.monotonic_ns()
    log = w.env.workdir / "child.log"
    child = await Child.start(name, w.variant.command(w.env), log)
    w.stack.push_async_callback(child.stop, s.shutdown_s)
    if on_child is not None:
        await on_child(child)
    marks: list[int] = []
    polling = await w.conn.channel()

    async def mark(queues: Sequence[str], until: Callable[[int], bool]) -> None:
        marks.append(await _poll(polling, queues, until))

    inputs, everything = w.variant.input_queues, workload.messages
    await child.wait_for(mark(inputs, lambda n: n < everything), "starting", 120)
    before = await w.meter.sample(child.pid, w.env.name)
    say(f"{name}: draining")
    outputs, target = (OUTPUT_QUEUE,), tally.target
    limit_s = 60 + s.messages / s.min_rate
    await child.wait_for(mark(outputs, lambda n: n >= target), "draining", limit_s)
    after = await w.meter.sample(child.pid, w.env.name)
    await polling.close()
    if read_back:
        await w.stack.enter_async_context(counting(w.conn, w.counter))
        limit_s = 60 + s.messages / 1000
        await child.wait_for(tally.done.wait(), "reading the outputs back", limit_s)
    drain_s = (marks[1] - marks[0]) / 1e9
    cpu = CpuMeter.delta(before, after)
    return (
        child,
        workload,
        tally,
        {
            "msg_s": round(workload.messages / drain_s, 1),
            "drain_s": round(drain_s, 3),
            "startup_s": round((marks[0] - spawned) / 1e9, 3),
            "publish_msg_s": round(workload.messages / publish_s, 1),
            "cpu_s": cpu,
            "cpu_ms_per_msg": {
                role: round(secs * 1000 / workload.messages, 4)
                for role, secs in cpu.items()
            },
        },
    )


async def _latency(
    w: _Wiring, s: Settings, rate: float, child: Child
) -> tuple[Workload, Tally, dict[str, Any]]:
    """Publish at *rate* with the child running; per-message latency."""
    workload = Workload(
        phase="l", messages=max(1, round(rate * (s.warmup_s + s.latency_s))),
        accounts=s.accounts, duplicates=s.duplicates, seed=s.seed, stamped=True,
    )  # fmt: skip
    tally = _tally(w, workload)
    say(f"{w.variant.name}: {workload.messages} messages at {rate:.0f} msg/s")
    # This process's full collections would show up as latency: its heap
    # (the workloads, the drain's tallies) is frozen out of their sight.
    gc.collect()
    gc.freeze()
    before = await w.meter.sample(child.pid, w.env.name)
    achieved: list[float] = []

    async def publish() -> None:
        achieved.append(await publish_paced(w.publisher, workload, rate))

    await child.wait_for(publish(), "publishing at a fixed rate", 60 + 3 * s.latency_s)
    await child.wait_for(tally.done.wait(), "answering the paced messages", 120)
    after = await w.meter.sample(child.pid, w.env.name)
    # The first warmup_s is the way out of the drain (RabbitMQ settling the
    # backlog's acks, the queues compacting): reported, not in the figures.
    since = min(tally.stamps_ns, default=0) + round(s.warmup_s * 1e9)
    return (
        workload,
        tally,
        {
            "rate": round(rate, 1),
            "achieved_rate": round(achieved[0], 1),
            # The publisher could not keep up: RabbitMQ (or this process) is the limit.
            "saturated": achieved[0] < 0.95 * rate,
            "messages": workload.messages,
            "p50_ms": _ms(tally.latency_ms(50, since_ns=since)),
            "p99_ms": _ms(tally.latency_ms(99, since_ns=since)),
            "max_ms": _ms(tally.latency_ms(100, since_ns=since)),
            "warmup_s": s.warmup_s,
            "with_warmup": {
                "p99_ms": _ms(tally.latency_ms(99)),
                "max_ms": _ms(tally.latency_ms(100)),
            },
            "cpu_s": CpuMeter.delta(before, after),
        },
    )


def _write_trace(base: Path, variant: str, tally: Tally) -> None:
    """``sent_ms,latency_ms,sent_unix_s`` per paced entry, in arrival order.

    ``sent_ms`` counts from the first publish; ``sent_unix_s`` is wall-clock
    time, to line the trace up with the daemon's log.
    """
    if not tally.stamps_ns:
        return
    first = min(tally.stamps_ns)
    wall_ns = time.time_ns() - time.monotonic_ns()
    path = base.with_name(f"{base.name}.{variant}")
    with path.open("w") as out:
        out.write("sent_ms,latency_ms,sent_unix_s\n")
        for stamp, latency in zip(tally.stamps_ns, tally.latencies_ns, strict=True):
            out.write(
                f"{(stamp - first) / 1e6:.3f},{latency / 1e6:.3f},"
                f"{(stamp + wall_ns) / 1e9:.4f}\n"
            )
    say(f"{variant}: latency trace in {path}")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def _stopped(w: _Wiring, child: Child, s: Settings) -> list[str]:
    """SIGTERM the child; a problem unless it exits 0 within the grace."""
    status = await child.stop(s.shutdown_s)
    if status == 0:
        return []
    what = "was killed" if status is None else f"exited with status {status}"
    return [f"after SIGTERM, {w.variant.name} {what}:\n{child.tail()}"]


async def _run_variant(
    variant: Variant, s: Settings, services: Services, meter: CpuMeter
) -> dict[str, Any]:
    async with _wired(variant, services, meter) as w:
        child, drained, drain_tally, result = await _drain(w, s)
        rate = s.rate if s.rate is not None else result["msg_s"] / 2
        paced, lat_tally, latency = await _latency(w, s, rate, child)
        if s.latency_trace is not None:
            _write_trace(s.latency_trace, variant.name, lat_tally)
        problems = await _stopped(w, child, s)
        problems += _tally_problems(w, drain_tally, drained)
        problems += _tally_problems(w, lat_tally, paced)
        if w.counter.foreign:
            problems.append(f"{w.counter.foreign} outputs of no phase")
        expected = merge_expected(drained.expected(), paced.expected())
        problems += await variant.verify(w.env, expected)
    verdict = "correct" if not problems else "WRONG: " + "; ".join(problems)
    say(f"{variant.name}: {verdict}")
    return {
        **result,
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "latency": latency,
        # Outputs beyond what was due. A deduplicating pipeline should have
        # none in a clean run; if it had any, its drain was timed short.
        "extra_outputs": sum(t.total - t.target for t in (drain_tally, lat_tally)),
        "correct": not problems,
        "problems": problems,
    }


async def _run_backlog(
    s: Settings, services: Services, meter: CpuMeter
) -> dict[str, Any]:
    rss: list[int] = []
    async with (
        _wired(EngineVariant(), services, meter) as w,
        anyio.create_task_group() as tg,
    ):

        async def sample(child: Child) -> None:
            tg.start_soon(_sample_rss, child.pid, rss)

        child, workload, _, result = await _drain(
            w, s, phase="b", read_back=False, on_child=sample
        )
        tg.cancel_scope.cancel()
        # Outputs were counted (the drain waited for all of them), not read:
        # reading a million back costs minutes. Postgres is checked in full.
        problems = await _stopped(w, child, s)
        problems += await w.variant.verify(w.env, workload.expected())
    peak_mb = round(max(rss, default=0) / 2**20, 1)
    return {
        **result,
        "max_rss_mb": peak_mb,
        "rss_limit_mb": RSS_LIMIT_MB,
        "rss_ok": 0 < peak_mb <= RSS_LIMIT_MB,
        "rss_samples": len(rss),
        "correct": not problems,
        "problems": problems,
    }


async def _sample_rss(pid: int, out: list[int]) -> None:
    process = psutil.Process(pid)
    while True:
        try:
            out.append(int(process.memory_info().rss))
        except psutil.NoSuchProcess:
            return
        await anyio.sleep(1)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not b.get("msg_s"):
        return None
    return round(float(a["msg_s"]) / float(b["msg_s"]), 3)


def _table(report: dict[str, Any]) -> str:
    head = (
        f"{'variant':<12}{'msg/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'@msg/s':>8}"
        f"{'cpu s: proc':>12}{'rabbit':>7}{'pg':>7}{'bench':>7}  correct"
    )
    lines = [head, "-" * len(head)]
    for name in VARIANTS:
        r = report.get(name)
        if r is None:
            continue
        cpu = r["cpu_s"]
        lines.append(
            f"{name:<12}{r['msg_s']:>8.0f}{_cell(r['p50_ms'])}{_cell(r['p99_ms'])}"
            f"{r['latency']['achieved_rate']:>8.0f}{cpu['daemon']:>12.2f}"
            f"{cpu['rabbitmq']:>7.2f}{cpu['postgres']:>7.2f}{cpu['bench']:>7.2f}"
            f"  {'yes' if r['correct'] else 'NO'}"
        )
    ratios = report["ratios"]
    lines.append(
        f"{report['messages']} messages per drain; engine/passthrough "
        f"{ratios['engine_vs_passthrough']}, engine/naive {ratios['engine_vs_naive']}"
    )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.1f}"


async def _main(args: argparse.Namespace, out: dict[str, Any]) -> None:
    s = Settings(
        messages=args.messages or (1_000_000 if args.rss else 20_000),
        accounts=args.accounts,
        duplicates=args.duplicates,
        rate=args.rate,
        latency_s=args.latency_s,
        warmup_s=args.warmup_s,
        seed=args.seed,
        min_rate=args.min_rate,
        shutdown_s=args.shutdown_s,
        latency_trace=args.latency_trace,
    )
    out["messages"] = s.messages
    # Other work on the machine skews every figure; the load says if there was any.
    out["machine"] = {"cpus": os.cpu_count(), "load_1m_before": os.getloadavg()[0]}
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope, out)
        token = base64.b64encode(b"guest:guest").decode()
        http = await stack.enter_async_context(
            aiohttp.ClientSession(headers={"Authorization": f"Basic {token}"})
        )
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        stack.push_async_callback(admin.close)
        services, meter = Services(http), CpuMeter(admin)
        if args.rss:
            out["rss"] = await _run_backlog(s, services, meter)
            out["correct"] = out["rss"]["correct"]
        else:
            variants: dict[str, Variant] = {
                "engine": EngineVariant(),
                "naive": NaiveVariant(),
                "passthrough": PassthroughVariant(),
            }
            for name in args.only:
                out[name] = await _run_variant(variants[name], s, services, meter)
            out["ratios"] = {
                "engine_vs_passthrough": _ratio(
                    out.get("engine"), out.get("passthrough")
                ),
                "engine_vs_naive": _ratio(out.get("engine"), out.get("naive")),
            }
            out["correct"] = all(out[name]["correct"] for name in args.only)
        out["machine"]["load_1m_after"] = os.getloadavg()[0]
        tg.cancel_scope.cancel()


async def _stop_on_signal(scope: anyio.CancelScope, out: dict[str, Any]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            out["interrupted"] = signal.Signals(signum).name
            scope.cancel()
            return


def _only(text: str) -> list[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    if not names or names - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.ledger",
        description="Benchmark the engine against a naive pipeline and a pass-through.",
    )
    p.add_argument(
        "--messages",
        type=int,
        help="messages per drain, duplicates included (20000; 1000000 with --rss)",
    )
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--duplicates", type=float, default=0.1, help="fraction repeated")
    p.add_argument(
        "--rate", type=float, help="latency phase msg/s (half the drain rate)"
    )
    p.add_argument("--latency-s", type=float, default=10.0)
    p.add_argument(
        "--warmup-s",
        type=float,
        default=1.0,
        help="paced publishing before the latency window (reported apart)",
    )
    p.add_argument(
        "--latency-trace",
        type=Path,
        metavar="CSV",
        help="write each paced entry's publish offset and latency (ms) here,"
        " one file per variant (CSV.<variant>)",
    )
    p.add_argument(
        "--only", type=_only, default=list(VARIANTS), help=",".join(VARIANTS)
    )
    p.add_argument(
        "--rss", action="store_true", help="engine's peak RSS over a backlog"
    )
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--min-rate", type=float, default=100.0, help="slowest drain allowed"
    )
    p.add_argument("--shutdown-s", type=float, default=45.0, help="grace after SIGTERM")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.ledger``; the last line printed is JSON."""
    args = _parser().parse_args(argv)
    out: dict[str, Any] = {}
    status = 0
    try:
        anyio.run(_main, args, out, backend_options={"use_uvloop": True})
    except* (BenchError, BrokerError) as group:
        out["error"] = "; ".join(str(e) for e in group.exceptions)
        say(f"bench: {out['error']}")
        status = 1
    if "interrupted" in out:
        say(f"bench: interrupted by {out['interrupted']}; cleaned up")
        status = 130
    if not args.json_only and "ratios" in out:
        print(_table(out))
    elif not args.json_only and "rss" in out:
        r = out["rss"]
        print(
            f"peak RSS {r['max_rss_mb']} MB (limit {RSS_LIMIT_MB} MB) draining "
            f"{out['messages']} messages at {r['msg_s']:.0f} msg/s"
        )
    out.setdefault("correct", False)
    print(json.dumps(out, default=str), flush=True)
    return status or (0 if out["correct"] else 1)


if __name__ == "__main__":
    sys.exit(main())
