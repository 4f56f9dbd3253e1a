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
import json
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg

from bench.engine import EngineVariant
from bench.harness import (
    PG_ADMIN_DSN,
    Child,
    CpuMeter,
    Services,
    Variant,
    say,
)
from bench.naive import NaiveVariant
from bench.passthrough import PassthroughVariant
from bench.phases import Settings, drain, run_variant, sample_rss, stopped, wired
from bench.workload import (
    BenchError,
)
from broker.errors import BrokerError

__all__ = ["VARIANTS", "RSS_LIMIT_MB", "EngineVariant", "main"]

VARIANTS = ("engine", "naive", "passthrough")
RSS_LIMIT_MB = 200


async def _run_backlog(
    s: Settings, services: Services, meter: CpuMeter
) -> dict[str, Any]:
    rss: list[int] = []
    async with (
        wired(EngineVariant(), services, meter) as w,
        anyio.create_task_group() as tg,
    ):

        async def sample(child: Child) -> None:
            tg.start_soon(sample_rss, child.pid, rss)

        child, workload, _, result = await drain(
            w, s, phase="b", read_back=False, on_child=sample
        )
        tg.cancel_scope.cancel()
        # Outputs were counted (the drain waited for all of them), not read:
        # reading a million back costs minutes. Postgres is checked in full.
        problems = await stopped(w, child, s)
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
                out[name] = await run_variant(variants[name], s, services, meter)
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
