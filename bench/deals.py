"""The quote-to-cash benchmark: complete deals per second on RabbitMQ and Postgres.

``python -m bench.deals --deals N`` runs, against the local RabbitMQ and
Postgres on a fresh vhost and database:

* the five sandboxes, zero latency and no faults, in one child process
  (`bench.deal_sandboxes`), which also plays the sales team: accounts,
  opportunities, quotes with one to three lines, approvals, flat out;
* the daemon, ``python -m broker run``, in another, configured for them.

A deal is complete when ``q2c.deal.completed`` arrives for it: the CRM
opportunity and account read back, the quote validated, the order routed,
enriched and booked (SAP OData or an IDoc round trip through the legacy
ERP's folders), CRM and CPQ updated, the subscription provisioned in Stripe
for recurring lines, the invoice and the shipment received — about fifteen
messages through the daemon and half a dozen vendor calls. The clock starts
when the sales team starts and stops at the last completion. CPU seconds of
the daemon, the sandboxes, RabbitMQ and Postgres are taken over that window,
and the daemon's own counters (``/metrics``) give messages per deal.

The last line of the output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import anyio
import asyncpg
import msgspec
import psutil

from actors.q2c_demo import systems_tables
from bench.harness import (
    MANAGEMENT_URL,
    PG_ADMIN_DSN,
    Child,
    CpuMeter,
    Env,
    Services,
    say,
)
from bench.workload import BenchError

OUTPUT_QUEUE = "q2c.events.bench"

_CONFIG = """\
[daemon]
name = "q2c-bench-deals"
transport = "amqp"
store = "postgres"
[amqp]
url = {amqp_url}
management-url = {management_url}
[postgres]
dsn = {dsn}
[topology]
shards = {shards}
retry-tiers-s = [0.5, 2.0, 5.0]
[topology.event-queues]
{output_queue} = ["q2c.deal.completed", "q2c.exception.raised"]
[http]
port = {port}
[control]
socket-path = {socket}
[logging]
level = "warning"
"""


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and lists are valid TOML


def _systems_toml(urls: dict[str, str], concurrency: int, linger: float) -> str:
    """The ``[systems]`` tables, as the demo writes them, for the bench's sandboxes."""
    fast = {
        "rate-per-s": 100_000.0,
        "burst": 1000,
        "concurrency": concurrency,
        "prefetch": concurrency * 2,
        "batch-linger-s": linger,
    }
    systems = systems_tables(
        urls, Path(urls["idoc_out"]), Path(urls["idoc_in"]), fast=fast
    )
    lines: list[str] = []
    for name, table in systems.items():
        lines.append(f"[systems.{name}]")
        gateway = table.pop("gateway", {})
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append(f"[systems.{name}.gateway]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in gateway.items())
    return "\n".join(lines) + "\n"


async def _stuck(dsn: str) -> dict[str, int]:
    """What the unfinished deals are waiting for, from their stored state."""
    from actors.workflows.deal import DealState

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT state FROM saga WHERE workflow = 'deal'")
        for dl in await conn.fetch(
            "SELECT queue, reason, left(detail, 300) AS detail, count(*) AS n"
            " FROM dead_letter GROUP BY 1, 2, 3 LIMIT 10"
        ):
            say(f"dead letters: {dict(dl)}")
    finally:
        await conn.close()
    waiting: dict[str, int] = {}
    for row in rows:
        s = msgspec.json.decode(row["state"], type=DealState)
        if s.stage in ("completed", "exception"):
            continue
        missing = [
            name
            for name, have in (
                ("opportunity", s.opportunity),
                ("quote", s.quote),
                ("order", s.order),
                ("booking", s.erp_order_id),
                ("crm", s.crm_native_id),
                ("cpq", s.cpq_native_id),
                ("invoice", s.invoice),
                ("shipment", s.shipment or not s.needs_shipment),
                ("subscription", s.subscription_native_id or not s.needs_subscription),
            )
            if not have
        ]
        key = f"{s.erp}:{'+'.join(missing)}"
        waiting[key] = waiting.get(key, 0) + 1
    return waiting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_total" not in line:
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0].removeprefix("q2c_").removesuffix("_total")
        totals[metric] = totals.get(metric, 0.0) + float(value)
    return totals


#: Where each HTTP sandbox's state counts the requests made of it.
_REQUEST_COUNTERS = {
    "crm": ("api_requests",),
    "sap": ("requests",),
    "stripe": ("counts", "requests"),
}


async def _vendor_requests(
    http: aiohttp.ClientSession, urls: dict[str, str]
) -> dict[str, int]:
    """Requests made of each sandbox so far (the CRM's: what an org's limit counts)."""
    counts: dict[str, int] = {}
    for system, path in _REQUEST_COUNTERS.items():
        async with http.get(f"{urls[system]}/_sandbox/state") as resp:
            value: Any = await resp.json()
        for name in path:
            value = value.get(name, 0)
        counts[system] = int(value)
    return counts


async def _main(args: argparse.Namespace, out: dict[str, Any]) -> None:
    deals: int = args.deals
    async with AsyncExitStack() as stack:
        # The management API (vhosts) wants the broker's credentials; the
        # daemon's own endpoints ignore them.
        http = await stack.enter_async_context(
            aiohttp.ClientSession(
                headers={"Authorization": aiohttp.encode_basic_auth("guest", "guest")}
            )
        )
        env: Env = await Services(http).open("deals", database=True, stack=stack)
        boxes = await Child.start(
            "sandboxes",
            [
                sys.executable,
                "-m",
                "bench.deal_sandboxes",
                str(env.workdir),
                str(deals),
            ],
            env.workdir / "sandboxes.log",
        )
        stack.push_async_callback(boxes.stop, 10)
        urls_file = anyio.Path(env.workdir / "urls.json")

        async def urls_ready() -> None:
            while not await urls_file.exists():  # noqa: ASYNC110 - a file is the signal
                await anyio.sleep(0.05)

        await boxes.wait_for(urls_ready(), "starting", 60)
        urls = json.loads(await urls_file.read_text())
        port = _free_port()
        config = env.workdir / "broker.toml"
        q = json.dumps
        config.write_text(
            _CONFIG.format(
                amqp_url=q(env.amqp_url),
                management_url=q(MANAGEMENT_URL),
                dsn=q(env.dsn),
                shards=args.shards,
                output_queue=q(OUTPUT_QUEUE),
                port=port,
                socket=q(str(env.workdir / "brokerd.sock")),
            )
            + _systems_toml(urls, args.concurrency, args.linger_s)
        )
        daemon = await Child.start(
            "daemon",
            [sys.executable, "-m", "broker", "--config", str(config), "run"],
            env.workdir / "daemon.log",
        )
        stack.push_async_callback(daemon.stop, 30)
        base = f"http://127.0.0.1:{port}"

        async def ready() -> None:
            while True:
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.2)

        await daemon.wait_for(ready(), "starting", 60)
        connection = await aio_pika.connect_robust(env.amqp_url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(OUTPUT_QUEUE, passive=True)
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        stack.push_async_callback(admin.close)
        meter = CpuMeter(admin)
        boxes_proc = psutil.Process(boxes.pid)
        cpu_boxes_before = sum(boxes_proc.cpu_times()[:2])
        cpu_before = await meter.sample(daemon.pid, env.name)
        metrics_before = await _metrics(http, base)
        requests_before = await _vendor_requests(http, urls)

        finished: dict[str, str] = {}
        done = anyio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                body = msgspec.json.decode(message.body)
                data = body.get("data", {})
                finished.setdefault(data.get("deal_id", ""), body.get("type", ""))
                if len(finished) >= deals:
                    done.set()

        say(f"driving {deals} deals through the daemon (RabbitMQ + Postgres)")
        if args.profile:
            spy = await Child.start(
                "py-spy",
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-f",
                    "raw",
                    "-r",
                    "100",
                    "-o",
                    args.profile,
                    "--pid",
                    str(daemon.pid),
                    # py-spy writes its file when the duration ends.
                    "--duration",
                    str(args.profile_s),
                ],
                env.workdir / "py-spy.log",
            )
            stack.push_async_callback(spy.stop, 10)
        started = time.monotonic()
        await anyio.Path(env.workdir / "go").write_text(base)
        await queue.consume(on_message)
        try:
            await daemon.wait_for(
                done.wait(), "deals completing", max(120.0, deals / 5)
            )
        except BenchError:
            say(f"{len(finished)} of {deals} deals finished")
            say(f"unfinished deals by what they wait for: {await _stuck(env.dsn)}")
            say(f"daemon log:\n{daemon.tail(30)}\nsandboxes log:\n{boxes.tail(30)}")
            raise
        elapsed = time.monotonic() - started
        if args.profile:
            with anyio.move_on_after(120):  # it writes the file when done
                await spy.process.wait()
            say(f"py-spy: {spy.tail(1)}")
        cpu = CpuMeter.delta(cpu_before, await meter.sample(daemon.pid, env.name))
        cpu["sandboxes"] = round(sum(boxes_proc.cpu_times()[:2]) - cpu_boxes_before, 3)
        metrics = await _metrics(http, base)
        delta = {k: v - metrics_before.get(k, 0.0) for k, v in metrics.items()}
        requests_after = await _vendor_requests(http, urls)
        requests = {k: v - requests_before[k] for k, v in requests_after.items()}
        completed = sum(1 for t in finished.values() if t == "q2c.deal.completed")
        out.update(
            deals=deals,
            completed=completed,
            exceptions=deals - completed,
            seconds=round(elapsed, 2),
            deals_per_s=round(deals / elapsed, 1),
            messages_per_deal=round(delta.get("messages_received", 0.0) / deals, 1),
            vendor_calls_per_deal=round(delta.get("gateway_calls", 0.0) / deals, 1),
            webhooks_per_deal=round(delta.get("webhook_requests", 0.0) / deals, 1),
            vendor_requests_per_deal={
                system: round(n / deals, 1) for system, n in requests.items()
            },
            cpu_s=cpu,
            window_cpu_s=round(elapsed * (psutil.cpu_count() or 1), 1),
        )
        say(
            f"{deals} deals in {elapsed:.1f} s: {out['deals_per_s']} deals/s "
            f"({completed} completed); CPU s {cpu}"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.deals``; the last line printed is JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.deals", description=__doc__)
    p.add_argument("--deals", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32, help="calls per system")
    p.add_argument(
        "--linger-s",
        type=float,
        default=0.005,
        help="system actors' batch-linger-s: completions committed together",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="record the daemon with py-spy over the window (raw folded stacks)",
    )
    p.add_argument("--profile-s", type=int, default=20, help="seconds to record")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"bench": "deals"}
    status = 0
    try:
        anyio.run(
            _main, args, out, backend="asyncio", backend_options={"use_uvloop": True}
        )
    except BenchError as exc:
        say(f"bench failed: {exc}")
        out["error"] = str(exc)
        status = 1
    print(json.dumps(out, default=str), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
