"""The benchmark's other side: the five sandboxes and the sales team, in one process.

``python -m bench.deal_sandboxes WORKDIR DEALS`` starts the sandboxes with no
latency and no faults, writes their URLs to ``WORKDIR/urls.json``, waits for
``WORKDIR/go`` (which holds the daemon's HTTP base URL), then creates DEALS
deals as fast as it can and keeps serving until SIGTERM. It runs apart from
the daemon so that the two do not share a core's time slices.
"""

from __future__ import annotations

import functools
import json
import random
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from actors.q2c_demo import Plan, drive_deals, start_sandboxes


async def _main(workdir: Path, deals: int) -> None:
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, workdir)
        urls = {
            **boxes.urls,
            "idoc_out": str(boxes.idoc_out),
            "idoc_in": str(boxes.idoc_in),
        }
        tmp = workdir / "urls.json.tmp"
        await anyio.Path(tmp).write_text(json.dumps(urls))
        await anyio.Path(tmp).rename(workdir / "urls.json")
        go = anyio.Path(workdir / "go")
        while not await go.exists():  # noqa: ASYNC110 - a file is the only signal
            await anyio.sleep(0.05)
        http = (await go.read_text()).strip()
        boxes.push_to(http)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        drive_deals,
                        boxes,
                        deals,
                        random.Random(5),
                        Plan(),
                        http,
                        faults=False,
                        pace=False,
                    )
                )
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break


def main() -> int:
    """``python -m bench.deal_sandboxes WORKDIR DEALS``."""
    workdir, deals = Path(sys.argv[1]), int(sys.argv[2])
    anyio.run(
        _main, workdir, deals, backend="asyncio", backend_options={"use_uvloop": True}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
