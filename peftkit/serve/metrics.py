"""What the HTTP server counts: requests by endpoint and status, their latency, the batches the worker ran.

Written from the event loop (requests) and the model thread (batches), read by ``GET /metrics``: one lock.
Latencies are kept for the last ``window`` requests of each endpoint, so the percentiles describe recent
traffic and memory stays bounded however long the server runs.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0-100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least the first
    return ordered[int(rank) - 1]


class Metrics:
    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self._window = window
        self._requests: dict[str, Counter] = defaultdict(Counter)
        self._latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=self._window))
        # per kind of batch (predict, generate): how many, and how many had each number of rows, requests, adapters
        self._batches: dict[str, dict[str, Counter]] = defaultdict(
            lambda: {"count": Counter(), "rows": Counter(), "requests": Counter(), "adapters": Counter()})
        self._abandoned = 0
        self._stream_mismatches = 0
        self.in_flight = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[endpoint][str(status)] += 1
            self._latency[endpoint].append(seconds)

    def batch(self, kind: str, rows: int, requests: int, adapters: int) -> None:
        """One model call: its rows, the requests they came from, the distinct adapters (or tasks) among them."""
        with self._lock:
            seen = self._batches[kind]
            seen["count"]["all"] += 1
            seen["rows"][str(rows)] += 1
            seen["requests"][str(requests)] += 1
            seen["adapters"][str(adapters)] += 1

    def abandoned(self, jobs: int) -> None:
        """Jobs whose client went away: dropped before they ran, or stopped mid-generation."""
        with self._lock:
            self._abandoned += jobs

    def stream_mismatch(self) -> None:
        with self._lock:
            self._stream_mismatches += 1

    def snapshot(self, queue_length: int) -> dict[str, Any]:
        with self._lock:
            latency = {}
            everything = [s for kept in self._latency.values() for s in kept]
            for endpoint, kept in [("all", everything), *sorted(self._latency.items())]:
                if kept:
                    values = list(kept)
                    latency[endpoint] = {"count": len(values), "p50_ms": round(1000 * percentile(values, 50), 3),
                                         "p99_ms": round(1000 * percentile(values, 99), 3)}
            return {
                "requests": {endpoint: dict(sorted(c.items())) for endpoint, c in sorted(self._requests.items())},
                "latency": latency,
                "batches": {kind: {"count": seen["count"]["all"],
                                   **{k: dict(sorted(c.items(), key=lambda kv: int(kv[0])))
                                      for k, c in seen.items() if k != "count"}}
                            for kind, seen in sorted(self._batches.items())},
                "queue_length": queue_length,
                "in_flight": self.in_flight,
                "abandoned_jobs": self._abandoned,
                "stream_mismatches": self._stream_mismatches,
            }
