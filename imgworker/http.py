"""HTTP policy of the API shared by the routes and the server: the error
body, security headers and CORS (a WSGI middleware), which routes take a
request body and how large, and who the client is.

The rate limiter, the metrics and the Waitress server set-up have their own
modules (ratelimit, metrics, server).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Any, Callable, Iterable

from . import config as config_mod
from .metrics import Metrics
from .model import JOB_ID_PATTERN

JOB_ID = re.compile(JOB_ID_PATTERN)


def id_forms(raw: str) -> list[str]:
    """A job or batch id as given, then in its other form (UUID <-> 32 hex
    digits), so ids of either kind are found whichever form a client uses."""
    if len(raw) == 32:
        return [raw, f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"]
    return [raw, raw.replace("-", "")]
MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and option fields

CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")


def json_error(status: int, message: str, code: str, **extra: Any) -> tuple[str, dict[str, str]]:
    """The error body of the contract and its headers."""
    body = json.dumps({"success": False, "error": message, "code": code, **extra})
    return body, {"Content-Type": "application/json", "Cache-Control": "no-store"}


UPLOAD_PATHS = ("/api/process/single", "/api/process/batch")
RETRY_PATH = re.compile(r"/api/job/[^/]+/retry")


def body_limit(method: str, path: str, cfg: config_mod.Config) -> int:
    """Largest request body (bytes on the wire, chunked or not) accepted by
    ``method path``; 0 for every route that takes no body."""
    if method != "POST":
        return 0
    if path == "/api/process/single":
        return cfg.max_file_bytes + MULTIPART_SLACK
    if path == "/api/process/batch":
        return cfg.max_file_bytes * cfg.batch_max_files + MULTIPART_SLACK
    return 0


def creates_work(method: str, path: str) -> bool:
    """The requests the rate limit counts: uploads and manual retries."""
    return method == "POST" and (path in UPLOAD_PATHS or bool(RETRY_PATH.fullmatch(path)))


def client_key(peer: str, forwarded_for: str | None, trust_proxy: bool) -> str:
    """The client as the rate limit sees it. Behind a trusted proxy it is
    the last X-Forwarded-For hop (the one the proxy added), the same address
    Waitress puts in REMOTE_ADDR; otherwise the peer. See :func:`client_of`."""
    if trust_proxy and forwarded_for:
        return client_of(forwarded_for.rsplit(",", 1)[-1].strip() or peer)
    return client_of(peer)


def client_of(host: str) -> str:
    """The key of per-client limits (connections, rate): the IPv4 address, or the /64
    of an IPv6 one (a single host commonly holds a whole /64, so counting
    single IPv6 addresses would let one client open a connection per address)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


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


def _allowed_origin(origin: str, cfg: config_mod.Config) -> bool:
    return bool(origin) and (origin.rstrip("/") in cfg.cors_origins or "*" in cfg.cors_origins)


def secure(app: Callable, cfg: config_mod.Config, metrics: Metrics) -> Callable:
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
