"""HTTP plumbing around the API: security headers and CORS (a WSGI
middleware), the per-IP rate limiter, body-size limits enforced by Waitress
on the request headers, and the Prometheus metrics text.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable

from . import config as config_mod

JOB_ID = re.compile(r"[0-9a-f]{32}")
MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and option fields

CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")


def json_error(status: int, message: str, code: str, **extra: Any) -> tuple[str, dict[str, str]]:
    """The error body of the contract and its headers."""
    body = json.dumps({"success": False, "error": message, "code": code, **extra})
    return body, {"Content-Type": "application/json", "Cache-Control": "no-store"}


def body_limit(path: str, cfg: config_mod.Config) -> int | None:
    """Largest request body accepted on ``path`` (None: no body expected)."""
    if path == "/api/process/single":
        return cfg.max_file_bytes + MULTIPART_SLACK
    if path == "/api/process/batch":
        return cfg.max_file_bytes * cfg.batch_max_files + MULTIPART_SLACK
    return MULTIPART_SLACK


def security_headers(path: str, cfg: config_mod.Config) -> list[tuple[str, str]]:
    headers = [
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Content-Security-Policy", CSP),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if not path.startswith("/api/images/"):
        headers.append(("Cross-Origin-Resource-Policy", "same-origin"))
    if cfg.env == "production":
        headers.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
    return headers


def pool_summary(states: list[dict[str, Any]]) -> dict[str, Any]:
    """What live supervisors report, combined: workers, paused and why."""
    paused = [s for s in states if s.get("paused")]
    return {
        "workers": {k: sum(s.get("workers", {}).get(k, 0) for s in states) for k in ("configured", "alive", "busy")},
        "paused": bool(paused),
        "pauseReason": paused[0].get("pauseReason") if paused else None,
    }


def _allowed_origin(origin: str, cfg: config_mod.Config) -> bool:
    return bool(origin) and (origin.rstrip("/") in cfg.cors_origins or "*" in cfg.cors_origins)


def secure(app: Callable, cfg: config_mod.Config, metrics: "Metrics") -> Callable:
    """WSGI middleware: security headers on every response, CORS for the
    configured origins, and preflight answered here (not by a route)."""

    def middleware(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        origin = environ.get("HTTP_ORIGIN", "")
        allowed = _allowed_origin(origin, cfg)
        started = time.monotonic()
        if environ.get("REQUEST_METHOD") == "OPTIONS" and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
            if not allowed:
                body, hdrs = json_error(403, f"Origin {origin[:100]!r} is not allowed", "CORS_FORBIDDEN")
                start_response("403 Forbidden", list(hdrs.items()) + security_headers(path, cfg)
                               + [("Vary", "Origin"), ("Content-Length", str(len(body)))])
                return [body.encode()]
            start_response("204 No Content", security_headers(path, cfg) + [
                ("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                ("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", "Content-Type, If-None-Match"),
                ("Access-Control-Max-Age", "600"), ("Content-Length", "0"),
            ])
            return [b""]

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = [h for h in headers if h[0].lower() not in ("server",)]
            headers += security_headers(path, cfg)
            if allowed:
                headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                            ("Access-Control-Expose-Headers",
                             "ETag, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset")]
            metrics.request(environ.get("REQUEST_METHOD", "?"), status[:3], time.monotonic() - started)
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return middleware


class RateLimiter:
    """Fixed-window per-IP counter for work-creating requests (the POSTs).

    Status polls, downloads and health checks never count, so a client that
    polls every 500 ms is never locked out by its own polling.
    """

    def __init__(self, limit: int, window_s: float):
        self.limit = limit
        self.window = window_s
        self._hits: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def hit(self, key: str) -> tuple[bool, dict[str, str]]:
        """Count one request; (allowed, RateLimit-* headers)."""
        now = time.monotonic()
        with self._lock:
            if now >= self._next_prune:  # keep memory bounded by active clients
                self._hits = {k: v for k, v in self._hits.items() if now - v[0] < self.window}
                self._next_prune = now + self.window
            start, count = self._hits.get(key, (now, 0))
            if now - start >= self.window:
                start, count = now, 0
            allowed = count < self.limit
            if allowed:
                count += 1
            self._hits[key] = (start, count)
        reset = max(1, int(start + self.window - now + 0.999))
        return allowed, {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.limit - count),
                         "RateLimit-Reset": str(reset)}


class Metrics:
    """In-process counters of the API, rendered with the queue's and the
    supervisors' figures in the Prometheus text format (written by hand: a
    dozen lines do not justify a client library whose registry model does not
    fit figures read from the database on each scrape)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.rejections: Counter = Counter()
        self.accepted_jobs = 0
        self.accepted_bytes = 0
        self.latency = [0] * (len(self.BUCKETS) + 1)
        self.latency_sum = 0.0

    def request(self, method: str, status: str, seconds: float) -> None:
        with self._lock:
            self.requests[(method, status)] += 1
            self.latency_sum += seconds
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    self.latency[i] += 1
                    break
            else:
                self.latency[-1] += 1

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
            out.append("# HELP imgworker_http_request_seconds HTTP request latency in this API process.")
            out.append("# TYPE imgworker_http_request_seconds histogram")
            total = 0
            for bound, n in zip(self.BUCKETS, self.latency):
                total += n
                out.append(f'imgworker_http_request_seconds_bucket{{le="{bound}"}} {total}')
            total += self.latency[-1]
            out.append(f'imgworker_http_request_seconds_bucket{{le="+Inf"}} {total}')
            out.append(f"imgworker_http_request_seconds_sum {self.latency_sum:.6f}")
            out.append(f"imgworker_http_request_seconds_count {total}")
        pool = pool_summary(states)
        metric("workers", "gauge", "Worker processes of live supervisors.",
               [(f'{{state="{k}"}}', v) for k, v in pool["workers"].items()])
        metric("paused", "gauge", "1 while claiming is paused for memory pressure.", [("", int(pool["paused"]))])
        metric("supervisors", "gauge", "Supervisors with a recent heartbeat.", [("", len(states))])
        counters: Counter = Counter()
        for s in states:
            for k, v in s.get("counters", {}).items():
                if isinstance(v, (int, float)):
                    counters[k] += v
        for key, help_ in (("timeouts", "Workers killed on job timeout."), ("crashes", "Workers that died mid-job."),
                           ("recycled", "Workers replaced for memory."), ("spawned", "Worker processes started.")):
            metric(f"worker_{key}_total", "counter", f"{help_} (since supervisor start)", [("", counters[key])])
        by_code: Counter = Counter()
        # the bucket bounds come with the supervisors' state (the API never imports the supervisor)
        bounds = next((s["counters"]["processing_bounds_ms"] for s in states
                       if s.get("counters", {}).get("processing_bounds_ms")), [])
        buckets = [0] * (len(bounds) + 1)
        for s in states:
            c = s.get("counters", {})
            by_code.update(c.get("failed_by_code", {}))
            if c.get("processing_bounds_ms") == bounds:
                for i, n in enumerate(c.get("processing_buckets", [])):
                    buckets[i] += n
        metric("jobs_failed_by_code_total", "counter", "Jobs failed for good, by code (since supervisor start).",
               [(f'{{code="{code}"}}', n) for code, n in sorted(by_code.items())])
        metric("processed_input_bytes_total", "counter", "Input bytes of completed jobs (since supervisor start).",
               [("", counters["bytes_in"])])
        metric("processed_output_bytes_total", "counter", "Output bytes written (since supervisor start).",
               [("", counters["bytes_out"])])
        out.append("# HELP imgworker_processing_seconds Processing time of completed jobs (since supervisor start).")
        out.append("# TYPE imgworker_processing_seconds histogram")
        for bound, n in zip(bounds, buckets, strict=False):
            out.append(f'imgworker_processing_seconds_bucket{{le="{bound / 1000:g}"}} {n}')
        out.append(f'imgworker_processing_seconds_bucket{{le="+Inf"}} {buckets[-1]}')
        out.append(f"imgworker_processing_seconds_sum {counters['processing_ms_sum'] / 1000:.3f}")
        out.append(f"imgworker_processing_seconds_count {buckets[-1]}")
        rss = [(f'{{slot="{w["slot"]}"}}', w.get("rssMb", 0) * 2**20) for s in states for w in s.get("pool", [])]
        metric("worker_rss_bytes", "gauge", "Resident memory of each worker after its last job.", rss)
        mem = [s.get("memory", {}).get("percent") for s in states if s.get("memory")]
        metric("memory_used_percent", "gauge", "Memory use seen by the supervisor.", [("", max(mem))] if mem else [])
        return "\n".join(out) + "\n"


def limited_channel(cfg: config_mod.Config) -> type:
    """A Waitress channel class whose parser refuses, from the headers alone,
    a Content-Length over the endpoint's limit: JSON 413, body never read."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.utilities import Error, RequestEntityTooLarge

    class TooLarge(Error):
        code, reason = 413, "Payload Too Large"

        def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
            body, hdrs = json_error(413, self.body, "FILE_TOO_LARGE")
            data = body.encode()
            headers = list(hdrs.items()) + security_headers("", cfg) + [("Content-Length", str(len(data)))]
            return f"{self.code} {self.reason}", headers, data

    message = f"The upload is larger than the {cfg.max_file_size_mb:g} MB limit"

    class Parser(HTTPRequestParser):
        def parse_header(self, header_plus: bytes) -> None:
            super().parse_header(header_plus)
            limit = body_limit(self.path or "", cfg)
            if limit is not None and self.content_length > limit:
                self.error = TooLarge(message)
                self.completed = True

        def received(self, data: bytes) -> int:
            consumed = super().received(data)
            if isinstance(self.error, RequestEntityTooLarge):  # waitress's own (chunked) limit: same JSON
                self.error = TooLarge(message)
            return consumed

    class Channel(HTTPChannel):
        parser_class = Parser

    return Channel
