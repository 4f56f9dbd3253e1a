"""No secret, personal datum or amount reaches the log, at DEBUG (§7: 26).

The daemon runs at ``debug`` with a database password, entries carrying a
distinctive amount and a memo holding an e-mail address and a forged JSON
line after a CR/LF, and malformed and schema-invalid messages that carry
the same canaries in their bodies. Its whole log must then hold none of
them, and every line must be one JSON object: nothing split a line.
"""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.reliability.checker import wait_dead_letters
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Entry, Workload, raw_message

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

#: Trust authentication ignores it; the daemon still holds it in its DSN.
PASSWORD = "Canary-Pg-Secret-5417"
EMAIL = "canary.pii.5417@example.com"
AMOUNT = "987654.32"
FORGED = '\r\n{"event": "forged", "level": "error"}'


async def test_canaries_never_reach_the_log(scenario: Scenario) -> None:
    daemon = scenario.daemon
    workload = Workload.build(300)
    canaries = [
        Entry(
            account=f"acct-c{n}",
            entry_id=f"canary-{n}",
            amount=Decimal(AMOUNT),
            memo=f"{EMAIL}{FORGED}",
        )
        for n in range(20)
    ]
    leaky = f'{{"email": "{EMAIL}", "amount": {AMOUNT}, "memo": "{FORGED}"'
    bad = [
        raw_message("canary-truncated", leaky.encode()),
        raw_message(
            "canary-schema",
            canaries[0]
            .message()
            .body.replace(
                f'"amount":"{AMOUNT}"'.encode(), f'"amount":["{AMOUNT}"]'.encode()
            ),
        ),
    ]
    stream = [*workload.stream, *(c.message() for c in canaries), *bad]
    pg = urlsplit(scenario.pg_dsn)
    with_password = urlunsplit(
        pg._replace(netloc=f"{pg.username}:{PASSWORD}@{pg.hostname}:{pg.port}")
    )
    await daemon.start(
        {"logging": {"level": "debug"}, "postgres": {"dsn": with_password}}
    )
    await daemon.wait_ready()
    assert (await scenario.publish(stream)).confirmed == len(stream)
    await wait_dead_letters(scenario.pg_dsn, len(bad))
    await scenario.finish(
        Workload(entries=[*workload.entries, *canaries], stream=stream)
    )

    text = daemon.spec.log_path.read_text(errors="replace")
    events = {json.loads(line)["event"] for line in text.splitlines()}
    assert {"batch_handled", "delivery_dead_lettered", "store_pruned"} <= events
    for canary in (PASSWORD, EMAIL, AMOUNT, "forged"):
        assert canary not in text, f"{canary!r} reached the log"
    for line in text.splitlines():
        assert isinstance(json.loads(line), dict), line[:200]
