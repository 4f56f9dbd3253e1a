"""Finished workflow instances, deleted once nothing changed them for a while.

A workflow that says when an instance is over (``finished(state)``, see
`broker.workflow`) lets the hourly maintenance delete the instances that
are, once ``[core] finished-retention-days`` passed since their last
change. Without it the saga table grows by one row per deal for ever.

`prune_finished` pages through each such workflow's idle instances, oldest
first, decodes each state and asks the workflow. The delete re-checks the
version it read, so an instance a message changed in between stays (one a
message reads while it is deleted gets that message as a new instance, as
if it came after); held instances and instances with a timer due later
stay too. A state this daemon cannot decode (written by another
version of the workflow) is left alone. Pages are bounded, so the work
interleaves with the batches the store is committing meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec
import structlog

from broker.store import Store
from broker.workflow import Workflow, finished_test

__all__ = ["PAGE", "prune_finished"]

_log = structlog.get_logger(__name__)

#: Instances read per page.
PAGE: Final = 500


async def prune_finished(
    store: Store,
    workflows: Mapping[str, Workflow[Any]],
    *,
    retention_days: int,
    page: int = PAGE,
) -> dict[str, int]:
    """Delete the finished instances idle for *retention_days*; counts by workflow.

    Only workflows with a ``finished`` test take part; *retention_days* 0
    deletes nothing.

    Raises:
        StoreUnavailable: the store failed (what was deleted stays deleted).
    """
    if retention_days <= 0:
        return {}
    deleted: dict[str, int] = {}
    for name, workflow in workflows.items():
        finished = finished_test(workflow)
        if finished is None:
            continue
        decoder = msgspec.json.Decoder(workflow.state_type)
        count = undecodable = 0
        after = None
        while True:
            rows = await store.idle_sagas(
                name, idle_days=retention_days, after=after, limit=page
            )
            over: list[tuple[str, int]] = []
            for row in rows:
                try:
                    state = decoder.decode(row.state)
                except msgspec.DecodeError:
                    undecodable += 1
                    continue
                if finished(state):
                    over.append((row.correlation_id, row.version))
            count += await store.delete_sagas(name, over)
            last = rows[-1] if len(rows) == page else None
            if last is None or last.updated_at is None:
                break
            after = (last.updated_at, last.correlation_id)
        if undecodable:
            _log.warning(
                "finished_prune_undecodable",
                workflow=name,
                instances=undecodable,
            )
        deleted[name] = count
    return deleted
