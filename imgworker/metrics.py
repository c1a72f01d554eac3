"""Prometheus metrics of the API process, and the one reader of the state
the supervisors publish in their heartbeat row.

Written by hand: a few dozen lines do not justify a client library whose
registry model does not fit figures read from the database on each scrape.

Every label set is bounded: HTTP methods outside a fixed list and status
codes outside 100-599 collapse into ``other``, so a client inventing methods
cannot create series (issue 15 item 4); the other labels come from closed
sets the service defines (job statuses, error codes, worker slots).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterable

KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
OTHER = "other"


def method_label(method: str) -> str:
    """The request method as a label value from a closed set."""
    return method if method in KNOWN_METHODS else OTHER


def status_label(status: str) -> str:
    """A three-digit status as a label value; anything else is ``other``."""
    return status if len(status) == 3 and status.isdigit() and "100" <= status <= "599" else OTHER


class Histogram:
    """A Prometheus histogram: ``counts[i]`` is the number of observations
    at or below ``bounds[i]`` (cumulative), the last slot is ``+Inf`` (all of
    them). The supervisor publishes its processing times in this same shape
    (``processing_bounds_ms``/``processing_buckets``), so merging is adding.
    Not thread-safe on its own: callers hold their lock."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1

    def merge(self, counts: Iterable[int]) -> None:
        """Add another histogram's cumulative counts (same bounds)."""
        for i, n in enumerate(counts):
            if i < len(self.counts):
                self.counts[i] += n

    def lines(self, name: str, help_: str, scale: float = 1.0) -> list[str]:
        """The exposition lines; ``scale`` converts bounds and sum to the
        metric's unit (ms -> s: 0.001)."""
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for bound, n in zip(self.bounds, self.counts):
            out.append(f'{name}_bucket{{le="{bound * scale:g}"}} {n}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.counts[-1]}')
        out.append(f"{name}_sum {self.sum * scale:.6f}")
        out.append(f"{name}_count {self.counts[-1]}")
        return out


class SupervisorStates:
    """The states live supervisors publish (their heartbeat rows' JSON),
    read in one place. The shape, as the supervisor writes it::

        {"workers": {"configured", "alive", "busy"}, "paused", "pauseReason",
         "memory": {"percent", ...}, "pool": [{"slot", "rssMb", ...}],
         "counters": {"timeouts", "crashes", "recycled", "spawned", "bytes_in",
                      "bytes_out", "processing_ms_sum", "failed_by_code": {code: n},
                      "processing_bounds_ms": [...], "processing_buckets": [...]}}

    Missing keys read as zero/empty, so an older supervisor never breaks a scrape.
    """

    COUNTERS = ("timeouts", "crashes", "recycled", "spawned", "bytes_in", "bytes_out", "processing_ms_sum")

    def __init__(self, states: list[dict[str, Any]]):
        self.states = states

    def pool(self) -> dict[str, Any]:
        """Workers summed over supervisors; paused if any is, with its reason."""
        paused = [s for s in self.states if s.get("paused")]
        return {
            "workers": {k: sum(s.get("workers", {}).get(k, 0) for s in self.states)
                        for k in ("configured", "alive", "busy")},
            "paused": bool(paused),
            "pauseReason": paused[0].get("pauseReason") if paused else None,
        }

    def counters(self) -> Counter:
        total: Counter = Counter()
        for s in self.states:
            for key in self.COUNTERS:
                value = s.get("counters", {}).get(key, 0)
                if isinstance(value, (int, float)):
                    total[key] += value
        return total

    def failed_by_code(self) -> Counter:
        total: Counter = Counter()
        for s in self.states:
            total.update(s.get("counters", {}).get("failed_by_code", {}))
        return total

    def processing(self) -> Histogram:
        """Processing time (ms) of completed jobs; supervisors with other
        bucket bounds (an older version) are left out rather than mixed in."""
        bounds = next((s["counters"]["processing_bounds_ms"] for s in self.states
                       if s.get("counters", {}).get("processing_bounds_ms")), [])
        hist = Histogram(bounds)
        for s in self.states:
            c = s.get("counters", {})
            if c.get("processing_bounds_ms") == bounds:
                hist.merge(c.get("processing_buckets", []))
        hist.sum = self.counters()["processing_ms_sum"]
        return hist

    def worker_rss(self) -> list[tuple[str, int, float]]:
        """(node, slot, MB) of every worker: slots repeat across nodes, so the
        node (the supervisor's id) keeps each sample's labels unique."""
        return [(s.get("node", ""), w["slot"], w.get("rssMb", 0)) for s in self.states for w in s.get("pool", [])]

    def memory_percent(self) -> float | None:
        mem = [s.get("memory", {}).get("percent") for s in self.states if s.get("memory")]
        mem = [m for m in mem if isinstance(m, (int, float))]
        return max(mem) if mem else None


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def pool_summary(states: list[dict[str, Any]]) -> dict[str, Any]:
    """What live supervisors report, combined: workers, paused and why."""
    return SupervisorStates(states).pool()


class Metrics:
    """In-process counters of the API, rendered with the queue's and the
    supervisors' figures in the Prometheus text format."""

    LATENCY_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.rejections: Counter = Counter()
        self.accepted_jobs = 0
        self.accepted_bytes = 0
        self.latency = Histogram(self.LATENCY_BOUNDS_S)

    def request(self, method: str, status: str, seconds: float) -> None:
        with self._lock:
            self.requests[(method_label(method), status_label(status))] += 1
            self.latency.observe(seconds)

    def rejected(self, code: str) -> None:
        with self._lock:
            self.rejections[code] += 1

    def accepted(self, jobs: int, size: int) -> None:
        with self._lock:
            self.accepted_jobs += jobs
            self.accepted_bytes += size

    def render(self, stats: dict[str, Any], states: list[dict[str, Any]]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP imgworker_{name} {help_}")
            out.append(f"# TYPE imgworker_{name} {kind}")
            for labels, value in samples:
                out.append(f"imgworker_{name}{labels} {value}")

        metric("jobs", "gauge", "Jobs in the database by status.",
               [(f'{{status="{s}"}}', n) for s, n in stats["byStatus"].items()])
        metric("jobs_accepted_total", "counter", "Jobs ever accepted.", [("", stats["totalJobs"])])
        metric("jobs_completed_total", "counter", "Jobs completed.", [("", stats["completedJobs"])])
        metric("jobs_failed_total", "counter", "Jobs failed for good.", [("", stats["failedJobs"])])
        metric("processing_time_avg_ms", "gauge", "Mean processing time of the last 100 jobs.",
               [("", stats["averageProcessingTime"])])
        with self._lock:
            metric("http_requests_total", "counter", "HTTP requests served by this API process.",
                   [(f'{{method="{m}",status="{s}"}}', n) for (m, s), n in sorted(self.requests.items())])
            metric("rejections_total", "counter", "Requests or files refused, by code.",
                   [(f'{{code="{c}"}}', n) for c, n in sorted(self.rejections.items())])
            metric("upload_bytes_total", "counter", "Bytes of accepted uploads.", [("", self.accepted_bytes)])
            out += self.latency.lines("imgworker_http_request_seconds", "HTTP request latency in this API process.")
        sup = SupervisorStates(states)
        pool = sup.pool()
        metric("workers", "gauge", "Worker processes of live supervisors.",
               [(f'{{state="{k}"}}', v) for k, v in pool["workers"].items()])
        metric("paused", "gauge", "1 while claiming is paused for memory pressure.", [("", int(pool["paused"]))])
        metric("supervisors", "gauge", "Supervisors with a recent heartbeat.", [("", len(states))])
        counters = sup.counters()
        for key, help_ in (("timeouts", "Workers killed on job timeout."), ("crashes", "Workers that died mid-job."),
                           ("recycled", "Workers replaced for memory."), ("spawned", "Worker processes started.")):
            metric(f"worker_{key}_total", "counter", f"{help_} (since supervisor start)", [("", counters[key])])
        metric("jobs_failed_by_code_total", "counter", "Jobs failed for good, by code (since supervisor start).",
               [(f'{{code="{code}"}}', n) for code, n in sorted(sup.failed_by_code().items())])
        metric("processed_input_bytes_total", "counter", "Input bytes of completed jobs (since supervisor start).",
               [("", counters["bytes_in"])])
        metric("processed_output_bytes_total", "counter", "Output bytes written (since supervisor start).",
               [("", counters["bytes_out"])])
        out += sup.processing().lines("imgworker_processing_seconds",
                                      "Processing time of completed jobs (since supervisor start).", scale=0.001)
        metric("worker_rss_bytes", "gauge", "Resident memory of each worker after its last job.",
               [(f'{{node="{_label(node)}",slot="{slot}"}}', mb * 2**20) for node, slot, mb in sup.worker_rss()])
        mem = sup.memory_percent()
        metric("memory_used_percent", "gauge", "Memory use seen by the supervisor.",
               [("", mem)] if mem is not None else [])
        return "\n".join(out) + "\n"
