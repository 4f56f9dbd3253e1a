"""Serving a sandbox: its aiohttp app on a local port (tests, demo, benchmark)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["serve"]


async def serve(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, str]:
    """Serve *app* on *host*:*port* (0 picks a free port).

    Returns:
        The runner (``cleanup()`` stops it) and the base URL.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, f"http://{host}:{runner.addresses[0][1]}"
