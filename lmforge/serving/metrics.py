"""Counters and latency histograms of the server, rendered in Prometheus' text format at ``/metrics``.

Labels only take values the server chooses (route templates, status codes), never raw client input, so
the number of series stays bounded whatever clients send.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Seconds; wide enough for a cached answer (~1 ms) and a long generation on a CPU (~1 min).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status) -> count
        self._latency_counts: dict[str, list[int]] = {}  # route -> count per bucket (+Inf last)
        self._latency_sums: dict[str, float] = defaultdict(float)
        self.counters: dict[str, int] = defaultdict(int)  # prompt_tokens, completion_tokens, rate_limited, ...
        self.in_flight = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self._latency_counts.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
            counts[index] += 1
            self._latency_sums[route] += seconds

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; ``gauges`` are point-in-time values (engine queue, cache size)."""
        lines = ["# HELP lmforge_requests_total HTTP requests answered, by method, route and status.",
                 "# TYPE lmforge_requests_total counter"]
        with self._lock:
            for (method, route, status), count in sorted(self.requests.items()):
                lines.append(f'lmforge_requests_total{{method="{method}",route="{route}",status="{status}"}} {count}')
            lines += ["# HELP lmforge_request_duration_seconds Time to answer a request, by route.",
                      "# TYPE lmforge_request_duration_seconds histogram"]
            for route, counts in sorted(self._latency_counts.items()):
                cumulative = 0
                for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
                    cumulative += count
                    lines.append(f'lmforge_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {cumulative}')
                lines.append(f'lmforge_request_duration_seconds_sum{{route="{route}"}} {self._latency_sums[route]:.6f}')
                lines.append(f'lmforge_request_duration_seconds_count{{route="{route}"}} {cumulative}')
            for name, value in sorted(self.counters.items()):
                lines += [f"# TYPE lmforge_{name}_total counter", f"lmforge_{name}_total {value}"]
            lines += ["# TYPE lmforge_requests_in_flight gauge", f"lmforge_requests_in_flight {self.in_flight}"]
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE lmforge_{name} gauge", f"lmforge_{name} {value}"]
        return "\n".join(lines) + "\n"
