"""Running the app under uvicorn with a graceful shutdown: drain first, then stop.

On the first SIGTERM or Ctrl-C the server stops taking work (new requests get a 503 OpenAI error, the
listening socket stays open so they are answered rather than refused) while the requests in flight
finish; then uvicorn's normal shutdown runs, whose lifespan end stops the engine. A second signal exits
at once.
"""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
import time
import urllib.request

import uvicorn

from lmforge.errors import LmforgeError
from lmforge.serving.guard import ServerState


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs as the signal handler, on the event loop's thread between two of its callbacks.
        if self.state.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            if self.state.draining:
                self.force_exit = True
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        print(f"draining: {self.state.in_flight} request(s) in flight finish, new ones get 503", file=sys.stderr)
        if not await self.state.wait_idle(self.drain_timeout):
            print(f"draining: {self.state.in_flight} request(s) still running after {self.drain_timeout:g} s; stopping anyway",
                  file=sys.stderr)
        self.should_exit = True


def serve_until_stopped(app, host: str, port: int, drain_timeout: float) -> None:
    """Serve ``app`` (made by ``create_app``) until a signal; returns after the graceful shutdown."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = DrainingServer(config, app.state.server, drain_timeout)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind
        raise LmforgeError(f"could not listen on {host}:{port} (is the port in use, or the address not this machine's?)") from None
    if not server.started:
        raise LmforgeError(f"the server did not start on {host}:{port}")


def wait_until_serving(base_url: str, process: subprocess.Popen, timeout: float = 120.0) -> str | None:
    """Poll ``base_url``/health until a started ``lmforge serve`` process answers (None), or say why it did not."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            return f"lmforge serve exited with status {process.returncode}"
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=1) as response:
                if response.status == 200:
                    return None
        except (OSError, http.client.HTTPException):
            # Not listening yet; an HTTPException is a connection that met itself (TCP self-connect on a free port).
            pass
        if time.monotonic() > deadline:
            return f"lmforge serve did not answer {base_url}/health within {timeout:.0f} s"
        time.sleep(0.2)
