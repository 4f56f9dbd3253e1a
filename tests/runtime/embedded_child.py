"""An embedded daemon (memory transport, SQLite) fed ledger entries, run until killed.

``python -m tests.runtime.embedded_child ENTRIES``: starts `Daemon` on the
configuration the environment gives, publishes `workload(ENTRIES)` to
``q2c.events`` (every publish confirmed), prints ``fed`` and runs on, until
the test kills it by pid.
"""

from __future__ import annotations

import sys
from decimal import Decimal

import anyio

from actors.demo import entry_message
from broker import Daemon, load_config
from broker.transport import OutgoingMessage, PublishOutcome


def workload(entries: int) -> list[OutgoingMessage]:
    """*entries* distinct entries over 50 accounts, then every tenth again."""
    distinct = [
        entry_message(f"acct-{n % 50:02d}", f"e{n:05d}", Decimal(n) / 100)
        for n in range(entries)
    ]
    return distinct + distinct[::10]


async def main(entries: int) -> None:
    daemon = Daemon(load_config())
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(30):
            await daemon.started.wait()
        stream = workload(entries)
        for i in range(0, len(stream), 250):
            outcomes = await daemon.runtime.transport.publish(
                stream[i : i + 250], timeout_s=10
            )
            assert set(outcomes) == {PublishOutcome.ACK}, outcomes
        print("fed", flush=True)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), backend_options={"use_uvloop": True})
