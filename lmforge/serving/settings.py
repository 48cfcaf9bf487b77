"""What a server is configured with: its limits and its security switches (from `lmforge serve` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.serving.protocol import RequestLimits


@dataclass(frozen=True)
class ServeSettings:
    api_keys: tuple[str, ...] = ()  # empty: no authentication (only ever on a loopback address)
    # Host header names accepted (DNS-rebinding defence on loopback); None accepts any Host.
    allowed_hosts: tuple[str, ...] | None = None
    max_batch_size: int = 8  # sequences decoded together by the engine
    max_queue: int = 64  # engine requests waiting or running; past it, 429 at once
    # HTTP requests being read or answered at once; past it, 503 before the body is read. None: 4 x max_queue + 16.
    # With max_body_bytes this bounds the memory requests can hold.
    max_in_flight: int | None = None
    rate_limit_per_minute: float = 600.0  # per API key (per client address without auth); 0 = no limit
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for (the context bounds it too)
    max_n: int = 8  # most choices per request
    max_prompt_tokens: int | None = None  # None: the model's context
    max_body_bytes: int = 1_048_576  # request bodies above this get 413 before any parsing
    request_timeout: float = 120.0  # seconds for a whole request (streams included); then 504 and cancelled
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; empty: CORS off
    cache_size: int = 256  # responses of temperature-0 requests kept; 0 = no cache
    feedback_file: Path | None = None  # where the chat page's ratings go; None: RUN/feedback/feedback.jsonl
    compile: bool = False  # compile the one-stream decode step (torch.compile; needs a C++ compiler on CPU)
    static_dir: Path | None = None  # the chat page's files; None: the packaged lmforge/serving/static

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight if self.max_in_flight is not None else 4 * self.max_queue + 16

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(max_tokens=self.max_tokens_limit, max_n=self.max_n)
