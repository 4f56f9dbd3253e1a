"""The phases every variant of `bench.ledger` goes through, in order.

`wired` opens a variant's fresh vhost and database with a publishing
channel; `drain` publishes the backlog, starts the variant's process and
times it until the last output; `latency` publishes at a fixed rate and
measures each entry's latency after a warm-up; `stopped` sends SIGTERM and
expects a clean exit. `run_variant` chains them and checks the outputs and
the database.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil

from bench.harness import (
    Child,
    CpuMeter,
    Env,
    Services,
    Variant,
    deadline,
    say,
)
from bench.workload import (
    OUTPUT_QUEUE,
    OutputCounter,
    Tally,
    Workload,
    counting,
    merge_expected,
    publish_backlog,
    publish_paced,
    ready_count,
)
from broker.transport.channel import WireChannel
from broker.transport.wire import WireConnection

__all__ = [
    "Settings",
    "Wiring",
    "drain",
    "run_variant",
    "sample_rss",
    "stopped",
    "wired",
]

_POLL_S = 0.01


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
class Wiring:
    """One variant's services, connection and output counter."""

    variant: Variant
    env: Env
    conn: WireConnection
    publisher: WireChannel
    counter: OutputCounter
    meter: CpuMeter
    stack: AsyncExitStack


@asynccontextmanager
async def wired(
    variant: Variant, services: Services, meter: CpuMeter
) -> AsyncIterator[Wiring]:
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
        yield Wiring(
            variant=variant, env=env, conn=conn, publisher=publisher,
            counter=OutputCounter(),  # reads outputs once `counting` starts it
            meter=meter, stack=stack,
        )  # fmt: skip


async def _close(conn: WireConnection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.close()


def _tally(w: Wiring, workload: Workload) -> Tally:
    dupes_out = w.variant.passes_duplicates
    return w.counter.expect(
        Tally(
            phase=workload.phase,
            distinct=workload.distinct,
            target=workload.messages if dupes_out else workload.distinct,
            count_all=dupes_out,
        )
    )


def _tally_problems(w: Wiring, tally: Tally, workload: Workload) -> list[str]:
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


async def drain(
    w: Wiring,
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
    w: Wiring, s: Settings, rate: float, child: Child
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

    rss: list[int] = []

    async def publish() -> None:
        achieved.append(await publish_paced(w.publisher, workload, rate))

    async with anyio.create_task_group() as tg:
        # Over a long run (a soak), RSS that keeps growing is a leak.
        tg.start_soon(sample_rss, child.pid, rss)
        limit_s = 60 + 3 * (s.warmup_s + s.latency_s)
        await child.wait_for(publish(), "publishing at a fixed rate", limit_s)
        await child.wait_for(tally.done.wait(), "answering the paced messages", 120)
        tg.cancel_scope.cancel()
    after = await w.meter.sample(child.pid, w.env.name)
    cpu = CpuMeter.delta(before, after)
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
            "cpu_s": cpu,
            # Per paced message (warm-up included, as in cpu_s): against the
            # drain's cpu_ms_per_msg, what a trickle costs beyond a backlog.
            "cpu_us_per_msg": {
                role: round(secs * 1e6 / workload.messages, 1)
                for role, secs in cpu.items()
            },
            "rss_mb": {
                "first": _mb(rss[0]) if rss else None,
                "last": _mb(rss[-1]) if rss else None,
                "max": _mb(max(rss)) if rss else None,
            },
        },
    )


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


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


async def stopped(w: Wiring, child: Child, s: Settings) -> list[str]:
    """SIGTERM the child; a problem unless it exits 0 within the grace."""
    status = await child.stop(s.shutdown_s)
    if status == 0:
        return []
    what = "was killed" if status is None else f"exited with status {status}"
    return [f"after SIGTERM, {w.variant.name} {what}:\n{child.tail()}"]


async def run_variant(
    variant: Variant, s: Settings, services: Services, meter: CpuMeter
) -> dict[str, Any]:
    async with wired(variant, services, meter) as w:
        child, drained, drain_tally, result = await drain(w, s)
        rate = s.rate if s.rate is not None else result["msg_s"] / 2
        paced, lat_tally, latency = await _latency(w, s, rate, child)
        if s.latency_trace is not None:
            _write_trace(s.latency_trace, variant.name, lat_tally)
        problems = await stopped(w, child, s)
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


async def sample_rss(pid: int, out: list[int]) -> None:
    """Append *pid*'s RSS in bytes to *out* every second until it exits."""
    process = psutil.Process(pid)
    while True:
        try:
            out.append(int(process.memory_info().rss))
        except psutil.NoSuchProcess:
            return
        await anyio.sleep(1)
