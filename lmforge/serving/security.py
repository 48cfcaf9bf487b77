"""API keys, per-key rate limits, the DNS-rebinding host check and log escaping for the server."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from lmforge.errors import LmforgeError

API_KEYS_ENV = "LMFORGE_API_KEYS"


def key_id(key: str) -> str:
    """A stable name for a key that is safe to log: a short hash, never the key itself."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class KeyRing:
    """The accepted API keys, checked in constant time.

    Every candidate is compared with every key through SHA-256 digests and ``hmac.compare_digest``, with
    no early exit, so the time taken says nothing about how much of a key was right or which key matched.
    The comparison is case-sensitive (the bytes of the key).
    """

    def __init__(self, keys: list[str]):
        self._digests = [(hashlib.sha256(key.encode("utf-8")).digest(), key_id(key)) for key in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, candidate: str) -> str | None:
        """The key id of ``candidate`` when it is one of the keys, else None."""
        candidate_digest = hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).digest()
        found = None
        for digest, name in self._digests:
            if hmac.compare_digest(candidate_digest, digest):
                found = name
        return found


def load_api_keys(key_file: Path | None, environ=os.environ) -> list[str]:
    """Keys from ``key_file`` (one per line; blank lines and ``#`` comments skipped) and from the
    comma-separated ``LMFORGE_API_KEYS`` environment variable."""
    keys: list[str] = []
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LmforgeError(f"cannot read the API key file {path}: {exc}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise LmforgeError(f"the API key file {path} holds no keys (one key per line)")
        keys += from_file
    keys += [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    for key in keys:
        if any(char.isspace() for char in key) or not key.isprintable():
            raise LmforgeError("an API key contains spaces or control characters; keys must be single printable words")
    return list(dict.fromkeys(keys))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme is case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests in a burst, refilled at ``per_minute`` a minute.

    Thread-safe. At most ``max_clients`` buckets are kept (least recently used dropped), so unauthenticated
    servers, which key buckets by client address, cannot be made to grow without bound.
    """

    def __init__(self, per_minute: float, max_clients: int = 10_000, clock=time.monotonic):
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, time)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0.0 when the request may go ahead (a token is taken), else the seconds until one is free."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - last) * self._rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self._rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        return wait


def retry_after_header(wait_seconds: float) -> str:
    return str(max(1, math.ceil(wait_seconds)))


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HOST_HEADER = re.compile(r"^(?P<name>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?$")


def host_header_allowed(host_header: str | None, allowed_names: tuple[str, ...]) -> bool:
    """Whether a ``Host`` header names this machine (DNS-rebinding defence for a loopback server).

    A page on ``evil.example`` that rebinds its name to 127.0.0.1 still sends ``Host: evil.example``; only
    the loopback names, with an optional port, pass. Anything else (paths, userinfo, spaces) fails.
    """
    if not host_header:
        return False
    match = _HOST_HEADER.match(host_header)
    return bool(match) and match["name"].lower() in allowed_names


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def escape_for_log(text: str, limit: int = 300) -> str:
    """``text`` on one line: control characters (CR, LF, ANSI ESC, Unicode line separators) become escapes.

    Anything a client sends (paths, model names) goes through this before it reaches the log, so it can
    never start a forged log line or recolour a terminal. Long values are cut to ``limit`` characters.
    """
    if len(text) > limit:
        text = text[:limit] + "..."
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif not char.isprintable():
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)
