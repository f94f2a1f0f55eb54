"""Running an ASGI app under uvicorn with Shoal's shutdown rules."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from infra.tls import ClusterTls


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after shutdown, which kills the process
    before the caller's cleanup runs; Shoal handles the signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


KEEP_ALIVE_S = 75
"""Idle keep-alive connections stay open this long (uvicorn's default of 5 s
makes clients that reuse a connection just as it is closed see read errors)."""


async def run_server(app: ASGIApp, host: str, port: int, *, log_level: str = "warning",
                     tls: ClusterTls | None = None) -> None:  # fmt: skip
    """Serve until SIGINT/SIGTERM, then return (so ``finally`` blocks run);
    over TLS when ``tls`` serves it."""
    options = tls.uvicorn_options() if tls is not None else {}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=KEEP_ALIVE_S, **options)  # type: ignore[arg-type]  # fmt: skip
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def _exit() -> None:
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
