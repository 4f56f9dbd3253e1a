"""Reading a vendor's Retry-After header, and counting the requests made of it."""

from __future__ import annotations

import email.utils
import socket
from collections import Counter
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

from adapters.serving import serve
from adapters.session import read_bounded, request_counter, retry_after_s


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("5", 5.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None)],
)
def test_delta_seconds_and_what_is_not_a_header(
    value: str | None, expected: float | None
) -> None:
    """Seconds are read as they are (never negative); absent or unreadable is None."""
    assert retry_after_s(value) == expected


@pytest.mark.parametrize("usegmt", [True, False])
def test_an_http_date_is_seconds_from_now_with_or_without_a_zone(usegmt: bool) -> None:
    """``GMT`` and the zone-less ``-0000`` form both mean UTC; a past date is 0."""
    later = datetime.now(UTC) + timedelta(seconds=120)
    header = email.utils.format_datetime(later, usegmt=usegmt)
    if not usegmt:
        header = header.replace("+0000", "-0000")  # no zone information
    waited = retry_after_s(header)
    assert waited is not None
    assert 100 < waited <= 120
    past = email.utils.format_datetime(later - timedelta(hours=1), usegmt=True)
    assert retry_after_s(past) == 0.0


@pytest.mark.anyio
async def test_every_request_is_counted_by_its_answer() -> None:
    """One count per request, by class; no answer at all counts as ``failed``."""
    statuses = [200, 204, 302, 404, 429, 503]

    async def answer(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        headers = {"Location": "/end/200"} if status == 302 else {}
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/end/{status}", answer)
    runner, base = await serve(app, "127.0.0.1", 0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    counted: Counter[str] = Counter()
    try:
        async with aiohttp.ClientSession(
            trace_configs=[request_counter(lambda status: counted.update([status]))]
        ) as session:
            for status in statuses:
                async with session.get(
                    f"{base}/end/{status}", allow_redirects=False
                ) as resp:
                    assert resp.status == status
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"http://127.0.0.1:{closed}/")
    finally:
        await runner.cleanup()
    assert counted == {"2xx": 2, "3xx": 1, "4xx": 1, "429": 1, "5xx": 1, "failed": 1}


@pytest.mark.anyio
async def test_a_body_past_the_limit_is_a_payload_error_not_read_whole() -> None:
    """A vendor's runaway answer cannot fill the daemon's memory."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 300_000)

    app = web.Application()
    app.router.add_get("/big", big)
    runner, base = await serve(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/big") as response:
                assert len(await read_bounded(response, 300_000)) == 300_000
            async with session.get(f"{base}/big") as response:
                with pytest.raises(aiohttp.ClientPayloadError, match="larger than"):
                    await read_bounded(response, 100_000)
    finally:
        await runner.cleanup()
