"""A bounded cache of responses to identical deterministic requests (temperature 0)."""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict


class ResponseCache:
    """Least-recently-used map from a request's canonical JSON to its response body.

    Only greedy (temperature 0) requests are cached by the server: their answer depends on nothing but
    the request and the model, so replaying it is indistinguishable from recomputing it. ``capacity``
    bounds the number of entries (0 turns the cache off); each entry is bounded by the request limits.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(endpoint: str, request: dict) -> str:
        return json.dumps({"endpoint": endpoint, "request": request}, sort_keys=True, separators=(",", ":"))

    def get(self, key: str) -> dict | None:
        if self.capacity <= 0:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return copy.deepcopy(found)

    def put(self, key: str, response: dict) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = copy.deepcopy(response)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
