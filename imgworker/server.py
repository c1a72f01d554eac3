"""The API's Waitress server, hardened at the edge (issue 15 items 1, 2, 3, 6).

Waitress reads every request in one I/O thread (an asyncore loop) and hands
a request to a worker thread only once its headers *and whole body* have
arrived. Its own defences are a total connection limit (at which it stops
accepting: one client holding that many slow sockets locks everyone out), an
inactivity timeout that a client resets with one byte every few seconds, and
one body limit for every path. This module subclasses the three pieces whose
behaviour we need to change, and only through their documented hooks
(``parser_class``, ``error_task_class``, ``channel_class``, ``handle_accept``,
``maintenance``), so the changes are in one place:

* :class:`Parser` decides from the request headers, before any body byte is
  buffered: routes that take no body refuse one (413), an upload whose
  Content-Length is over its route's limit gets 413, and the API's admission
  check (rate limit, free disk) may refuse it. While a body arrives, chunked
  or not, the route's limit holds on the bytes read so far.
* :class:`Channel` records when a request started and when its headers
  ended, so that :meth:`Server.maintenance` can cut off a client whose
  headers take longer than HEADER_TIMEOUT_MS or whose body arrives slower
  than BODY_MIN_BYTES_PER_S (408), and close connections idle that long.
* :class:`Server` counts connections per client address and answers a
  client over MAX_CONNECTIONS_PER_CLIENT with 503 at once; at MAX_CONNECTIONS
  it closes the connection whose request progress is oldest (a body earns
  credit for what it has sent; one being answered is never closed) to admit
  the new one,
  instead of ceasing to accept, so a fresh client is always served.
* :class:`JsonErrorTask` writes every error Waitress produces itself (bad
  request line, bad or duplicate Content-Length, 431, 413, 501, 500) as the
  contract's JSON with the same security headers as the application.

The loop uses poll(), not select(): select() cannot watch a descriptor
numbered 1024 or more, which MAX_CONNECTIONS sockets reach.
"""

from __future__ import annotations

import functools
import os
import resource
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Protocol

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import Error

from . import config as config_mod
from . import log
from .http import body_limit, client_of, json_error, security_headers
from .metrics import Metrics
from .model import ErrorCode

LOG = log.get("api")
FD_HEADROOM = 256  # database, log, upload temp files, worker threads
ACCEPT_BATCH = 128  # connections accepted per loop round at most
RECV_BYTES = 64 * 1024  # bytes read from a socket per I/O-loop round (Waitress: 8 KiB)
GOOD_RATE_FACTOR = 8  # a body at 8 x BODY_MIN_BYTES_PER_S is "keeping up" for eviction
# Waitress' own errors (each a status) -> the contract's code, whose status is the same
WAITRESS_CODES = {c.http_status: c for c in (ErrorCode.BAD_REQUEST, ErrorCode.REQUEST_TIMEOUT, ErrorCode.FILE_TOO_LARGE,
                                            ErrorCode.HEADERS_TOO_LARGE, ErrorCode.INTERNAL_ERROR,
                                            ErrorCode.NOT_IMPLEMENTED)}


class Refusal(Error):
    """A request refused from its headers or while its body arrives: a
    Waitress error (so the channel answers it at once and closes) carrying
    the contract's code, whose status it is answered with (model.ErrorCode
    holds each code's status: one place), and extra response headers."""

    def __init__(self, code: ErrorCode, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.reason = code.http_status, HTTPStatus(code.http_status).phrase
        self.json_code = code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class RequestHead:
    """What the admission check sees: the request line, headers (Waitress'
    upper-case, underscore names) and the peer address."""

    method: str
    path: str
    headers: dict[str, str]
    peer: str
    content_length: int | None  # None when chunked


class Gate(Protocol):
    """The API's decisions on request heads, taken in the server's I/O
    thread (so: in memory and cheap)."""

    def admit(self, head: RequestHead) -> Refusal | None:
        """A refusal for this request before its body is read, or None."""

    def charge(self, head: RequestHead) -> None:
        """Count a request refused for its size against its client's rate
        limit (oversized uploads are attempts too: without this a client
        could make the server spool a route's limit per connection forever)."""


@dataclass
class Edge:
    """The server's policy: settings, the API's gate, metrics."""

    cfg: config_mod.Config
    gate: Gate
    metrics: Metrics
    max_connections: int = 0  # effective (may be lowered to fit the descriptor limit)


def error_response(status: int, code: str, message: str, path: str, cfg: config_mod.Config,
                   headers: dict[str, str] | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) of a JSON error written by the server."""
    body, hdrs = json_error(status, message, code)
    data = body.encode()
    out = list(hdrs.items()) + security_headers(path, cfg) + list((headers or {}).items())
    return f"{status} {HTTPStatus(status).phrase}", out + [("Content-Length", str(len(data)))], data


def raw_response(code: ErrorCode, message: str, cfg: config_mod.Config,
                 headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with ``code``'s status that closes the
    connection, for the places that answer without a request task
    (connection refusal, timeouts)."""
    line, hdrs, data = error_response(code.http_status, code, message, "", cfg, headers)
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs + [("Connection", "close")])
    return f"HTTP/1.1 {line}\r\n{head}\r\n".encode("latin-1") + data


class JsonErrorTask(ErrorTask):
    """Every error Waitress answers itself, as JSON with the security headers."""

    def execute(self) -> None:
        e = self.request.error
        edge: Edge = self.channel.server.edge
        code = getattr(e, "json_code", None) or WAITRESS_CODES.get(e.code, ErrorCode.BAD_REQUEST)
        message = str(e.body)[:300]
        if code == ErrorCode.FILE_TOO_LARGE:
            message = f"The upload is larger than the {edge.cfg.max_file_size_mb:g} MB limit"
        path = getattr(self.request, "path", "") or ""
        # e.code: Waitress' status for its own errors, the code's for a Refusal
        status, headers, body = error_response(e.code, code, message, path, edge.cfg, getattr(e, "headers", None))
        self.status = status
        self.response_headers.extend(headers)
        self.set_close_on_finish()
        self.content_length = len(body)
        edge.metrics.request(getattr(self.request, "command", "") or "", str(e.code), 0.0)
        edge.metrics.rejected(code)
        self.write(body)


class Parser(HTTPRequestParser):
    """Waitress' parser plus the per-route decisions taken on the headers
    and the per-route body limit held while the body arrives."""

    def __init__(self, adj: Any, channel: "Channel"):
        super().__init__(adj)
        self.channel = channel
        self.started = time.monotonic()  # created on the request's first byte
        self.headers_at: float | None = None
        self.limit = 0
        self.head: RequestHead | None = None

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)  # a ParsingError here becomes a JSON 400
        self.headers_at = time.monotonic()
        edge = self.channel.server.edge
        path = self.path or ""
        self.limit = body_limit(self.command, path, edge.cfg)
        self.head = RequestHead(self.command, path, self.headers, self.channel.addr[0],
                                None if self.chunked else self.content_length)
        if (self.chunked or self.content_length > 0) and self.limit == 0:
            self._refuse(Refusal(ErrorCode.BODY_NOT_ALLOWED, f"{self.command} {path[:100]} takes no request body"))
            return
        refusal = edge.gate.admit(self.head)  # first: a client over its limit gets 429, whatever it sends
        if refusal is not None:
            self._refuse(refusal)
        elif self.content_length > self.limit:
            self._too_large()

    def _too_large(self) -> None:
        self._refuse(Refusal(ErrorCode.FILE_TOO_LARGE, ""))
        if self.head is not None:
            self.channel.server.edge.gate.charge(self.head)

    def _refuse(self, error: Error) -> None:
        # completed with an error: the channel queues an error task, stops
        # reading, answers and closes; the body is never buffered. No
        # "100 Continue" either: the channel would send one (and mark the
        # request incomplete again) for a client that sent Expect, inviting
        # the very body we refuse
        self.error = error
        self.completed = True
        self.expect_continue = False

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.body_rcv is not None and self.error is None and self.body_bytes_received > self.limit:
            # chunked bodies have no Content-Length to refuse up front: the
            # limit holds on what has arrived, within one read of it
            self._too_large()
        return consumed


class Channel(HTTPChannel):
    """One client connection, with the timestamps the deadlines need."""

    error_task_class = JsonErrorTask

    def __init__(self, server: "Server", sock: socket.socket, addr: Any, adj: Any, map: dict | None = None):
        # every parser Waitress creates for this connection knows it
        self.parser_class = functools.partial(Parser, channel=self)
        self.idle_since = time.monotonic()
        super().__init__(server, sock, addr, adj, map=map)

    def service(self) -> None:
        super().service()
        self.idle_since = time.monotonic()

    def busy(self) -> bool:
        """A request being received, queued or running, or an answer not yet
        sent; an idle keep-alive connection is not busy."""
        return bool(self.request or self.requests or self.total_outbufs_len)

    def progress(self, good_rate: float) -> float:
        """When this connection last made request progress, on the monotonic
        clock: when it was accepted or its last answer ended, for a request
        not yet sent or whose headers are arriving (a first byte sent late
        earns nothing: headers are not progress until they end), or, for a
        body, the end of its headers plus one second per ``good_rate`` bytes
        received, so a long upload arriving at a good rate stays "recent"
        while a trickle ages. At MAX_CONNECTIONS the connection with the
        oldest progress is closed; a just-opened one is the most recent of
        all, so a new client is never the one closed."""
        request = self.request
        if not isinstance(request, Parser) or request.headers_at is None:
            return self.idle_since
        return request.headers_at + request.body_bytes_received / good_rate

    def check_deadlines(self, now: float, header_s: float, min_rate: float) -> None:
        """Cut off a client too slow with its headers or body (408), close a
        connection idle longer than the header deadline. A request being
        answered is never cut here."""
        if self.requests or self.will_close or self.close_when_flushed:
            return
        request = self.request
        if not isinstance(request, Parser):
            if now - self.idle_since > header_s:
                self.will_close = True
        elif request.headers_at is None:
            if now - request.started > header_s:
                self._time_out("The request headers did not arrive in time")
        else:
            elapsed = now - request.headers_at
            if elapsed > header_s and request.body_bytes_received < min_rate * elapsed:
                self._time_out("The request body is arriving too slowly")

    def _time_out(self, message: str) -> None:
        edge: Edge = self.server.edge
        edge.metrics.rejected("REQUEST_TIMEOUT")
        # best effort: the socket is not waiting on any task output here
        self.send(raw_response(ErrorCode.REQUEST_TIMEOUT, message, edge.cfg))
        self.will_close = True

    def del_channel(self, map: dict | None = None) -> None:
        self.server.forget(self)
        super().del_channel(map)


class Server(TcpWSGIServer):
    """The listening socket: per-client connection limit and eviction of the
    least active connection at the total limit (see the module docstring)."""

    channel_class = Channel

    def __init__(self, application: Callable, edge: Edge, **kw: Any):
        self.edge = edge
        self.socket_map: dict[int, Any] = {}
        self.per_client: Counter = Counter()
        self._counted: set[int] = set()
        self._lock = threading.Lock()
        super().__init__(application, map=self.socket_map, **kw)

    # -- accepting ----------------------------------------------------------------------
    def handle_accept(self) -> None:
        """Accept every connection waiting (up to a bound), not one per loop
        round as Waitress does: a burst of attacker connections then leaves
        the kernel's backlog in a few rounds and a legitimate client queued
        behind it is not kept waiting one poll() round per connection."""
        for _ in range(ACCEPT_BATCH):
            try:
                pair = self.accept()
                if pair is None:  # nothing more waiting
                    return
                conn, addr = pair
                self.set_socket_options(conn)
            except OSError:  # the peer went away before we got to it
                continue
            self._admit(conn, self.fix_addr(addr))

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        client = client_of(addr[0])
        cfg = self.edge.cfg
        if not cfg.trust_proxy and self.per_client[client] >= cfg.max_connections_per_client:
            self._refuse(conn, ErrorCode.TOO_MANY_CONNECTIONS,
                         f"More than {cfg.max_connections_per_client} open connections from this address")
            return
        if len(self.active_channels) >= self.edge.max_connections:
            victim = self._least_active()
            if victim is None:  # every connection is being answered: a real overload
                self._refuse(conn, ErrorCode.SERVER_BUSY, "The server has too many connections; try again shortly")
                return
            self.edge.metrics.rejected(ErrorCode.CONNECTION_EVICTED)
            victim.handle_close()
        channel = self.channel_class(self, conn, addr, self.adj, map=self.socket_map)
        with self._lock:
            self.per_client[client] += 1
            self._counted.add(id(channel))

    def _refuse(self, conn: socket.socket, code: ErrorCode, message: str) -> None:
        self.edge.metrics.rejected(code)
        try:
            conn.setblocking(False)
            conn.send(raw_response(code, message, self.edge.cfg, {"Retry-After": "1"}))
        except OSError:
            pass
        conn.close()

    def _least_active(self) -> Channel | None:
        good_rate = GOOD_RATE_FACTOR * self.edge.cfg.body_min_bytes_per_s
        idle = [ch for ch in list(self.active_channels.values()) if isinstance(ch, Channel) and not ch.requests]
        return min(idle, key=lambda ch: ch.progress(good_rate), default=None)

    def forget(self, channel: Channel) -> None:
        """A connection closed: its client may open another."""
        with self._lock:
            if id(channel) in self._counted:
                self._counted.discard(id(channel))
                client = client_of(channel.addr[0])
                self.per_client[client] -= 1
                if self.per_client[client] <= 0:
                    del self.per_client[client]

    # -- deadlines ----------------------------------------------------------------------
    def maintenance(self, now: float) -> None:
        """Waitress' inactivity sweep (stalled readers), then our deadlines."""
        super().maintenance(now)
        mono = time.monotonic()
        cfg = self.edge.cfg
        for channel in list(self.active_channels.values()):
            if isinstance(channel, Channel):
                channel.check_deadlines(mono, cfg.header_timeout_ms / 1000, cfg.body_min_bytes_per_s)

    # -- running ------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        """One round of the I/O loop."""
        wasyncore.loop(timeout=timeout, map=self.socket_map, use_poll=True, count=1)

    def serve_until(self, stop: threading.Event, timeout: float = 0.2) -> None:
        while not stop.is_set():
            self.poll(timeout)

    def stop_listening(self) -> None:
        """Accept no new connection; open ones keep being served."""
        self.accepting = False
        self.del_channel()
        self.socket.close()

    def drain(self, seconds: float) -> None:
        """Serve until no connection is busy or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(
                ch.busy() for ch in list(self.socket_map.values()) if isinstance(ch, Channel)):
            self.poll(0.05)


def _fit_descriptors(wanted: int) -> int:
    """Raise the soft descriptor limit towards what ``wanted`` connections
    need (each may hold a socket and a spooled body); the connections that
    fit when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fit = max(16, (soft - FD_HEADROOM) // 2)
        LOG.warning("MAX_CONNECTIONS=%d needs %d file descriptors; the limit is %d, so %d connections are kept",
                    wanted, need, soft, fit)
        return fit
    return wanted


def build(app: Callable, cfg: config_mod.Config, gate: Gate, metrics: Metrics, port: int | None = None) -> Server:
    """The server for ``app`` on HOST:PORT (``port`` overrides), listening."""
    edge = Edge(cfg, gate, metrics)
    edge.max_connections = _fit_descriptors(cfg.max_connections)
    largest = max(body_limit("POST", p, cfg) for p in ("/api/process/single", "/api/process/batch"))
    return Server(
        app, edge, host=cfg.host, port=cfg.port if port is None else port,
        # uploads are received by the I/O thread; handlers mostly wait on
        # disk and SQLite, so a few more threads than cores keeps polls fast
        threads=8,
        # an upload arrives in 64 KiB reads, not Waitress' 8 KiB: a 1.5 MB photo
        # costs 24 rounds of the I/O loop instead of 190 (upload CPU -35 %)
        recv_bytes=RECV_BYTES,
        # our own accept logic evicts before this; Waitress' limit is the backstop
        connection_limit=edge.max_connections + 16,
        # stalled readers (a response nobody reads) go after this; slow
        # senders and idle connections are cut much sooner by the deadlines
        channel_timeout=60, cleanup_interval=1,
        max_request_body_size=largest + 1, ident="imgworker", expose_tracebacks=False,
        asyncore_use_poll=True,
        clear_untrusted_proxy_headers=True,
        # Behind a proxy (TRUST_PROXY) the client is the last X-Forwarded-For
        # hop; otherwise the header is dropped, so clients cannot spoof it.
        **({"trusted_proxy": "*", "trusted_proxy_count": 1, "trusted_proxy_headers": {"x-forwarded-for"}}
           if cfg.trust_proxy else {}),
    )


def free_bytes(*paths: str) -> int:
    """Free bytes for an unprivileged writer on the tightest of the
    filesystems holding ``paths`` (DATA_DIR and the temp dir, where Waitress
    spools bodies)."""
    out = []
    for p in paths or (tempfile.gettempdir(),):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        out.append(st.f_bavail * st.f_frsize)
    return min(out) if out else 0
