"""The ASGI layer every HTTP request passes before it reaches a route, and the access log after it.

In order: the Host check (DNS rebinding, loopback servers only), the shutdown gate (503 while draining),
authentication (every path except ``PUBLIC_PATHS`` and the static files), the per-key rate limit, and the
body size and read time limit. It works on ``scope["path"]``, the very string the router matches, so no
spelling of a path (``//v1``, ``%2Fv1``, a trailing ``/``) can reach a route without passing it: a path
is public only if it is exactly a public one, everything else needs a key, routed or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from lmforge.serving.metrics import Metrics
from lmforge.serving.protocol import error_bytes
from lmforge.serving.security import KeyRing, RateLimiter, bearer_token, escape_for_log, host_header_allowed, retry_after_header
from lmforge.serving.settings import ServeSettings

PUBLIC_PATHS = frozenset({"/", "/health"})
STATIC_PREFIX = "/static/"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECURITY_HEADERS = [
    # The chat page loads only its own script and style, talks only to this server, and cannot be framed.
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]

access_log = logging.getLogger("lmforge.serving.access")


def is_public(path: str) -> bool:
    """Paths served without a key: the chat page, /health and the page's static files (no ``..``, no ``//``)."""
    if path in PUBLIC_PATHS:
        return True
    if not path.startswith(STATIC_PREFIX):
        return False
    parts = path[len(STATIC_PREFIX):].split("/")
    return all(part not in ("", ".", "..") and "\\" not in part for part in parts)


@dataclass
class ServerState:
    """What the guard and the routes share: settings, keys, limits, counters and the shutdown switch."""

    settings: ServeSettings
    metrics: Metrics = field(default_factory=Metrics)
    routes: frozenset[str] = frozenset()  # the route table's paths, the only values a metrics label takes
    draining: bool = False
    in_flight: int = 0

    def __post_init__(self):
        self.keys = KeyRing(list(self.settings.api_keys))
        self.rate_limiter = RateLimiter(self.settings.rate_limit_per_minute)

    @property
    def auth_enabled(self) -> bool:
        return len(self.keys) > 0

    def route_label(self, path: str) -> str:
        if path in self.routes:
            return path
        return "/static" if is_public(path) and path.startswith(STATIC_PREFIX) else "other"

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class _Rejected(Exception):
    def __init__(self, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()):
        self.status, self.message, self.code, self.headers = status, message, code, list(headers)


class GuardMiddleware:
    """Pure ASGI middleware (streams pass through untouched); see the module docstring."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self._handle(scope, receive, send_with_headers)
        except _Rejected as rejection:
            await _send_error(send_with_headers, scope, rejection)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            self._log(scope, status[0], time.perf_counter() - started)

    async def _handle(self, scope, receive, send):
        state, settings = self.state, self.state.settings
        headers = _headers(scope)
        if settings.allowed_hosts is not None:
            hosts = headers.get(b"host", [])
            if len(hosts) != 1 or not host_header_allowed(hosts[0].decode("latin-1"), settings.allowed_hosts):
                raise _Rejected(403, "the Host header does not name this server (it only answers to localhost)", "forbidden_host")
        if state.draining:
            raise _Rejected(503, "the server is shutting down and accepts no new requests", "server_shutting_down",
                            [(b"connection", b"close")])
        path = scope["path"]
        if not is_public(path):
            scope["lmforge.key_id"] = client = self._authenticate(scope, headers)
            wait = state.rate_limiter.acquire(client)
            if wait > 0:
                state.metrics.add("rate_limited")
                raise _Rejected(429, f"rate limit of {settings.rate_limit_per_minute:g} requests per minute reached; "
                                f"retry in {retry_after_header(wait)} s", "rate_limit_exceeded",
                                [(b"retry-after", retry_after_header(wait).encode())])
        if state.in_flight >= settings.in_flight_limit and not is_public(path):
            state.metrics.add("rejected_overloaded")
            raise _Rejected(503, f"the server is answering {state.in_flight} requests already; retry shortly", "server_overloaded",
                            [(b"retry-after", b"1")])
        # In flight from here: a shutdown waits for this request, body upload included.
        state.in_flight += 1
        state.metrics.in_flight = state.in_flight
        try:
            if scope["method"] in BODY_METHODS:
                receive = await self._buffered_body(headers, receive)
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            state.metrics.in_flight = state.in_flight

    def _authenticate(self, scope, headers: dict[bytes, list[bytes]]) -> str:
        """The key id the request is made with (or the client address without auth); 401 otherwise."""
        if not self.state.auth_enabled:
            client = scope.get("client")
            return f"anonymous@{client[0] if client else 'unknown'}"
        values = headers.get(b"authorization", [])
        if not values:
            raise _Rejected(401, "missing API key: send the header `Authorization: Bearer <key>`", "missing_api_key",
                            [(b"www-authenticate", b"Bearer")])
        token = bearer_token(values[0].decode("latin-1")) if len(values) == 1 else None
        found = self.state.keys.identify(token) if token is not None else None
        if found is None:
            raise _Rejected(401, "invalid API key", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        return found

    async def _buffered_body(self, headers: dict[bytes, list[bytes]], receive):
        """Read the whole body (at most max_body_bytes, within the request timeout) before any parsing; 413/408."""
        limit = self.state.settings.max_body_bytes
        too_large = _Rejected(413, f"the request body is larger than the server's limit of {limit} bytes", "request_too_large",
                              [(b"connection", b"close")])
        declared = headers.get(b"content-length", [])
        if declared:
            try:
                if int(declared[0]) > limit:
                    raise too_large
            except ValueError:
                raise _Rejected(400, "the Content-Length header is not a number", "invalid_request") from None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.state.settings.request_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Rejected(400, "the client disconnected while sending the body", "client_disconnected")
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        raise too_large
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Rejected(408, "the request body was not received within the server's request timeout", "request_timeout",
                            [(b"connection", b"close")]) from None
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect notice is left to wait for

        return replay

    def _log(self, scope, status: int, seconds: float) -> None:
        route = self.state.route_label(scope["path"])
        self.state.metrics.observe_request(scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER", route, status, seconds)
        client = scope.get("client")
        access_log.info('%s "%s %s" %d %.1fms key=%s', escape_for_log(client[0] if client else "-"),
                        escape_for_log(scope["method"], 20), escape_for_log(scope["path"]), status, seconds * 1000,
                        escape_for_log(scope.get("lmforge.key_id", "-")))


def _headers(scope) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in scope.get("headers", []):
        found.setdefault(name.lower(), []).append(value)
    return found


async def _send_error(send, scope, rejection: _Rejected) -> None:
    body = b"" if scope["method"] == "HEAD" else error_bytes(rejection.status, rejection.message, rejection.code)
    length = len(error_bytes(rejection.status, rejection.message, rejection.code))
    await send({"type": "http.response.start", "status": rejection.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode()), *rejection.headers]})
    await send({"type": "http.response.body", "body": body})
