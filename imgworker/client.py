"""The Python client: the counterpart of the original ``ServerApiClient``.

Uploads to an imgworker server, polls, downloads; when the server is
unreachable, times out or answers 5xx (503 QUEUE_FULL included), it
processes the file here with the same pipeline and options and says so
(``source == "local"``). A 4xx about the file (400, 413, 415, 422) is
reported, never retried locally: the server's verdict on the file stands.
A 429 waits for Retry-After (bounded) once before falling back.

Talks HTTP (stdlib only) and uses imaging for the fallback; no queue, no DB.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from . import imaging, log
from .errors import ImageError
from .views import result_view

LOG = log.get("client")
# What this client takes back for format=auto: it writes files, so any
# format; AVIF first (the server and the local fallback negotiate the same way).
ACCEPT = "image/avif,image/webp,*/*;q=0.8"
MAX_RETRY_AFTER_S = 10
Progress = Callable[[str, str, dict], None]  # (file, stage, details)


class ServerUnavailable(Exception):
    """Connection refused, timeout, 5xx, or still rate limited: fall back."""


@dataclass
class FileResult:
    path: str
    ok: bool
    source: str = "server"              # "server" | "local"
    output: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    code: str | None = None
    fallback_reason: str | None = None

    @property
    def size_saved(self) -> int:
        return int((self.result or {}).get("optimization", {}).get("sizeSaved", 0)) if self.ok else 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _multipart(files: list[tuple[str, str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "imgworker-" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for field_name, filename, data in files:
        safe = filename.replace('"', "'").replace("\r", "").replace("\n", "")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{safe}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name-1``, ``name-2``... when taken: never overwrite silently."""
    candidate = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{suffix}"
        n += 1
    return candidate


def normalize_url(raw: str) -> str:
    """``http://host:port[/prefix]`` from what a user typed; ``localhost:3001``
    (no scheme) means http. ValueError with a sentence for anything else."""
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    text = text.rstrip("/")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"server URL {raw!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL {raw!r} is not like http://127.0.0.1:3001")
    return text


def human_size(n: float) -> str:
    """1853615 -> '1.8 MB' (binary units, as file managers show)."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class ServerApiClient:
    """``server_url``, ``poll_interval`` (s), ``max_poll_time`` (s), as in the
    original (which took milliseconds: values that can only be milliseconds
    are refused with a ValueError rather than polling every 500 s).

    When the server goes away while jobs are on it, the client waits up to
    ``reconnect_wait`` seconds for it to come back (the jobs are durable) and
    carries on; only then are the unfinished files processed here, and their
    server jobs cancelled (now, or at the end if the server is back by then;
    ``abandoned`` lists those that could not be). Finished files are never
    processed again."""

    server_url: str = "http://127.0.0.1:3001"
    poll_interval: float = 0.5
    max_poll_time: float = 180.0
    timeout: float = 30.0
    health_timeout: float = 2.0
    health_ttl: float = 30.0
    reconnect_wait: float = 15.0
    limits: imaging.Limits = field(default_factory=imaging.Limits)
    abandoned: set[str] = field(default_factory=set)
    server_limits: dict[str, Any] = field(default_factory=dict)
    _health: tuple[float, bool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.server_url = normalize_url(self.server_url)
        if not 0 < self.poll_interval < 60:
            raise ValueError(f"poll_interval is in seconds (0 < value < 60), got {self.poll_interval!r}"
                             + (f": for {self.poll_interval:g} ms pass {self.poll_interval / 1000:g}"
                                if self.poll_interval >= 60 else ""))
        if not 0 < self.max_poll_time <= 86_400:
            raise ValueError(f"max_poll_time is in seconds (at most a day), got {self.max_poll_time!r}"
                             + (f": for {self.max_poll_time:g} ms pass {self.max_poll_time / 1000:g}"
                                if self.max_poll_time > 86_400 else ""))

    # -- HTTP -----------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        import http.client  # here: `process --local` never needs it (14 ms of start-up, with ssl)

        parts = urlsplit(self.server_url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=timeout or self.timeout)
        try:
            conn.request(method, parts.path.rstrip("/") + path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServerUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    def _json(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, body = self._request(method, path, **kw)
        if status >= 500:
            try:
                detail = json.loads(body).get("code", "")
            except ValueError:
                detail = ""
            raise ServerUnavailable(f"HTTP {status} {detail}".strip())
        try:
            return status, headers, json.loads(body) if body else {}
        except ValueError:
            raise ServerUnavailable(f"HTTP {status} with a body that is not JSON") from None

    def check_server_health(self, refresh: bool = False) -> bool:
        """True when /api/health answers 200. The verdict is cached for
        ``health_ttl`` seconds (a failure during work resets it); the server's
        limits (``batchMaxFiles``...) are kept in ``server_limits``."""
        now = time.monotonic()
        if not refresh and self._health and now - self._health[0] < self.health_ttl:
            return self._health[1]
        try:
            status, _, body = self._request("GET", "/api/health", timeout=self.health_timeout)
            healthy = status == 200
            if healthy:
                self.server_limits = dict(json.loads(body).get("limits") or {})
        except (ServerUnavailable, ValueError, AttributeError):
            healthy = False
        self._health = (now, healthy)
        LOG.debug("Server-side image processing %s", "available" if healthy else "unavailable")
        return healthy

    def batch_size(self) -> int:
        """Files per batch request: the server's BATCH_MAX_FILES (from /api/health)."""
        try:
            return max(1, int(self.server_limits.get("batchMaxFiles") or 20))
        except (TypeError, ValueError):
            return 20

    def _post_upload(self, path: str, files: list[tuple[str, str, bytes]], fields: dict[str, str]) -> tuple[int, Any]:
        body, ctype = _multipart(files, fields)
        for attempt in range(2):
            status, headers, data = self._json("POST", path, body=body, headers={"Content-Type": ctype, "Accept": ACCEPT})
            if status != 429:
                return status, data
            wait = min(MAX_RETRY_AFTER_S, int(headers.get("retry-after", "1") or 1))
            if attempt == 0 and wait <= MAX_RETRY_AFTER_S:
                time.sleep(wait)
        raise ServerUnavailable("still rate limited after waiting for Retry-After")

    def _download(self, url: str, dest: Path) -> None:
        status, _, body = self._request("GET", url)
        if status != 200:
            raise ServerUnavailable(f"download answered HTTP {status}")
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(body)
        os.replace(tmp, dest)

    def _cancel(self, job_id: str) -> bool:
        """Cancel a server job we no longer wait for. True when it is gone
        (cancelled, or already unknown); False when it is running or finished
        (409) or the server cannot be reached (then it stays in ``abandoned``)."""
        try:
            status, _, _ = self._json("DELETE", f"/api/job/{job_id}", timeout=self.health_timeout)
        except ServerUnavailable:
            self.abandoned.add(job_id)
            return False
        self.abandoned.discard(job_id)
        return status in (200, 404)

    def cancel_abandoned(self) -> None:
        """Try again to cancel the server jobs given up while the server was away."""
        if self.abandoned and self.check_server_health(refresh=True):
            for job_id in list(self.abandoned):
                self._cancel(job_id)

    def _wait_for_server(self, why: str) -> bool:
        """The server went away with our jobs on it: wait up to
        ``reconnect_wait`` s for it to come back. True when it did."""
        self._health = None
        if self.reconnect_wait <= 0:
            return False
        LOG.warning("Server unavailable (%s): waiting up to %g s for it to come back", why, self.reconnect_wait)
        deadline = time.monotonic() + self.reconnect_wait
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(self.poll_interval, 0.1)))
            if self.check_server_health(refresh=True):
                LOG.warning("Server is back: carrying on with its jobs")
                return True
        return False

    @staticmethod
    def _fields(options: dict[str, Any], priority: int) -> dict[str, str]:
        fields = {k: str(v) for k, v in options.items() if v is not None}
        if priority:
            fields["priority"] = str(priority)
        return fields

    # -- one file ---------------------------------------------------------------
    def process_file(self, path: str | Path, out_dir: str | Path = ".", options: dict[str, Any] | None = None,
                     priority: int = 0, local: bool = False, progress: Progress | None = None) -> FileResult:
        """Process one file on the server (or locally when it cannot), writing
        the output into ``out_dir``. Never raises for a bad file: see FileResult."""
        path, out_dir = Path(path), Path(out_dir)
        options = dict(options or {})
        notify = progress or (lambda *_: None)
        results: dict[str, FileResult] = {}
        record = lambda r: results.__setitem__(r.path, r)  # noqa: E731
        if local:
            return self.process_locally(path, out_dir, options, "requested", notify)
        if not self.check_server_health():
            return self.process_locally(path, out_dir, options, "server unavailable", notify)
        try:
            LOG.debug("Processing %s on server...", path.name)
            notify(str(path), "uploading", {})
            status, data = self._post_upload("/api/process/single", [("image", path.name, path.read_bytes())],
                                             self._fields(options, priority))
            if status != 202:
                notify(str(path), "failed", data)
                return FileResult(str(path), False, error=data.get("error"), code=data.get("code"))
            notify(str(path), "queued", {"queuePosition": data.get("queuePosition")})
            job_id = data["jobId"]
            self._follow({job_id: path}, lambda: [self._job(job_id)], out_dir, options, notify, record)
        except ServerUnavailable as exc:
            self._health = None
            if str(path) not in results:
                record(self.process_locally(path, out_dir, options, f"server unavailable ({exc})", notify))
        self.cancel_abandoned()
        return results[str(path)]

    def _job(self, job_id: str) -> dict[str, Any]:
        status, _, job = self._json("GET", f"/api/job/{job_id}")
        if status != 200:
            raise ServerUnavailable(f"job status answered HTTP {status}")
        return job

    def _follow(self, job_of: dict[str, Path], fetch: Callable[[], list[dict[str, Any]]], out_dir: Path,
                options: dict[str, Any], notify: Progress, record: Callable[[FileResult], None]) -> None:
        """Poll ``fetch()`` until every job in ``job_of`` has an outcome, and
        ``record`` each file's result as soon as it has one (downloaded).

        The server going away is waited for (``reconnect_wait``); if it does
        not come back, the open jobs are cancelled where possible and
        ServerUnavailable is raised: the caller processes only the files not
        yet recorded. Jobs still waiting after ``max_poll_time`` are cancelled
        and done here; running ones get one more ``max_poll_time``."""
        open_jobs = dict(job_of)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + self.max_poll_time
        overtime = False
        while open_jobs:
            try:
                for job in fetch():
                    job_id = job["jobId"]
                    if job_id not in open_jobs or seen.get(job_id) == job["status"]:
                        continue
                    path = open_jobs[job_id]
                    if job["status"] in ("completed", "failed", "cancelled"):
                        record(self._finish(path, out_dir, job, notify))  # may raise: then seen again
                        del open_jobs[job_id]
                    elif job["status"] == "processing":
                        notify(str(path), "processing", job)
                    seen[job_id] = job["status"]
            except ServerUnavailable as exc:
                if self._wait_for_server(str(exc)):
                    continue
                for job_id in open_jobs:
                    self._cancel(job_id)
                raise
            if not open_jobs:
                break
            if time.monotonic() > deadline:
                waiting = {j: p for j, p in open_jobs.items() if overtime or seen.get(j) != "processing"}
                for job_id, path in waiting.items():
                    if self._cancel(job_id) or overtime:
                        del open_jobs[job_id]
                        record(self.process_locally(path, out_dir, options,
                                                    f"server did not finish it in {self.max_poll_time:g} s", notify))
                overtime, deadline = True, time.monotonic() + self.max_poll_time
                continue
            time.sleep(self.poll_interval)

    def _finish(self, path: Path, out_dir: Path, job: dict[str, Any], notify: Progress) -> FileResult:
        if job["status"] != "completed":
            notify(str(path), "failed", job)
            return FileResult(str(path), False, error=job.get("error") or f"job {job['status']}", code=job.get("errorCode"))
        result = job["result"]
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = unique_path(out_dir, f"{path.stem}.{Path(result['processedFile']['filename']).suffix.lstrip('.')}")
        self._download(result["processedFile"]["url"], dest)
        notify(str(path), "done", result)
        LOG.debug("Server processing completed: %s", dest.name)
        return FileResult(str(path), True, "server", str(dest), result)

    def process_locally(self, path: Path, out_dir: Path, options: dict[str, Any], reason: str,
                        notify: Progress | None = None) -> FileResult:
        """The same pipeline, here. ``reason`` says why (shown to the user)."""
        notify = notify or (lambda *_: None)
        LOG.debug("Processing %s on client (%s)", path.name, reason)
        notify(str(path), "processing", {"source": "local"})
        tmp = Path(tempfile.mkdtemp(prefix="imgworker-client-"))
        options = {**options, "accept": ACCEPT} if options.get("format") == "auto" else options
        try:
            job_id = uuid.uuid4().hex
            result = result_view(job_id, path.name, imaging.process(path, tmp, job_id, options, self.limits), url=False)
            out_dir.mkdir(parents=True, exist_ok=True)
            produced = tmp / result["processedFile"]["filename"]
            dest = unique_path(out_dir, f"{path.stem}{produced.suffix}")
            shutil.move(str(produced), dest)
            result["processedFile"]["filename"] = dest.name
            notify(str(path), "done", result)
            return FileResult(str(path), True, "local", str(dest), result, fallback_reason=reason)
        except ImageError as exc:
            notify(str(path), "failed", {"error": exc.message, "code": exc.code})
            return FileResult(str(path), False, "local", error=exc.message, code=exc.code, fallback_reason=reason)
        except OSError as exc:
            notify(str(path), "failed", {"error": exc.strerror, "code": "IO_ERROR"})
            return FileResult(str(path), False, "local", error=f"could not read or write the file ({exc.strerror})",
                              code="IO_ERROR", fallback_reason=reason)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- batches ---------------------------------------------------------------------
    def process_batch(self, paths: list[str | Path], out_dir: str | Path = ".", options: dict[str, Any] | None = None,
                      priority: int = 0, progress: Progress | None = None, local: bool = False,
                      batch_size: int | None = None, on_result: Callable[[FileResult], None] | None = None,
                      ) -> list[FileResult]:
        """Process many files through the batch endpoint (``batch_size`` per
        request; default: the server's BATCH_MAX_FILES), calling
        ``progress(file, stage, details)`` as each file moves through
        uploading -> queued -> processing -> done/failed, and
        ``on_result(FileResult)`` as soon as each file has its outcome."""
        paths = [Path(p) for p in paths]
        out_dir = Path(out_dir)
        notify = progress or (lambda *_: None)
        options = dict(options or {})
        results: dict[str, FileResult] = {}

        def record(r: FileResult) -> None:
            results[r.path] = r
            if on_result:
                on_result(r)

        pending = list(paths)
        while pending:
            if local or not self.check_server_health():
                reason = "requested" if local else "server unavailable"
                for p in pending:
                    record(self.process_locally(p, out_dir, options, reason, notify))
                break
            size = batch_size or self.batch_size()
            group, pending = pending[:size], pending[size:]
            try:
                self._server_batch(group, out_dir, options, priority, notify, record)
            except ServerUnavailable as exc:
                self._health = None
                for p in group:
                    if str(p) not in results:  # finished on the server: kept, never redone
                        record(self.process_locally(p, out_dir, options, f"server unavailable ({exc})", notify))
        self.cancel_abandoned()
        return [results[str(p)] for p in paths]

    def _server_batch(self, group: list[Path], out_dir: Path, options: dict[str, Any], priority: int,
                      notify: Progress, record: Callable[[FileResult], None]) -> None:
        for p in group:
            LOG.debug("Processing %s on server...", p.name)
            notify(str(p), "uploading", {})
        files = [("images", p.name, p.read_bytes()) for p in group]
        status, data = self._post_upload("/api/process/batch", files, self._fields(options, priority))
        if status != 202:  # every file refused: the body lists them
            rejected = {r.get("index"): r for r in data.get("rejected") or []}
            for i, p in enumerate(group):
                r = rejected.get(i, {"error": data.get("error"), "code": data.get("code")})
                notify(str(p), "failed", r)
                record(FileResult(str(p), False, error=r.get("error"), code=r.get("code")))
            return
        # every accepted job and rejected file carries its index in the upload
        job_of: dict[str, Path] = {}
        for job in data["jobs"]:
            job_of[job["jobId"]] = group[job["index"]]
            notify(str(group[job["index"]]), "queued", {"queuePosition": job.get("queuePosition")})
        no_room = []
        for r in data["rejected"]:
            path = group[r["index"]]
            if r.get("code") == "QUEUE_FULL":  # the server took what fit: the rest is done here
                no_room.append(path)
                continue
            notify(str(path), "failed", r)
            record(FileResult(str(path), False, error=r["error"], code=r["code"]))
        batch_id = data["batchId"]

        def fetch() -> list[dict[str, Any]]:
            code, _, batch = self._json("GET", f"/api/batch/{batch_id}")
            if code != 200:
                raise ServerUnavailable(f"batch status answered HTTP {code}")
            return batch["jobs"]

        for path in no_room:
            record(self.process_locally(path, out_dir, options, "server queue full", notify))
        self._follow(job_of, fetch, out_dir, options, notify, record)


# -- `imgworker process` ----------------------------------------------------------------
def expand(paths: list[str], formats: tuple[str, ...] = imaging.Limits().formats) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files to process, [(skipped file, reason)]). Files named on the
    command line are always tried; in folders (recursively, hidden files and
    folders left out) every regular file is identified by its first bytes,
    whatever its name (``.tif``, no extension, ``photo.jpg.bak``)."""
    out: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            out.append(p)
            continue
        for f in sorted(p.rglob("*")):
            if any(part.startswith(".") for part in f.relative_to(p).parts) or not f.is_file():
                continue
            try:
                with open(f, "rb") as fh:
                    kind = imaging.sniff(fh.read(32))
            except OSError as exc:
                skipped.append((f, f"cannot be read ({exc.strerror})"))
                continue
            if kind in formats:
                out.append(f)
            else:
                skipped.append((f, f"{kind.upper()} is not accepted" if kind else "not an image"))
    return out, skipped


class _Console:
    """Per-file lines on stdout as files finish, a progress bar on stderr
    when it is a terminal (cleared before any other line is written, log
    records included, so nothing is glued to it)."""

    def __init__(self, total: int, bar: bool):
        self.total, self.done, self.last, self.drawn = total, 0, "", False
        self.bar = bar and sys.stderr.isatty()

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self.drawn = False

    def _draw(self) -> None:
        if self.bar and self.last and self.done < self.total:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.last}"[:200])
            sys.stderr.flush()
            self.drawn = True

    def stage(self, name: str, stage: str) -> None:
        self._clear()
        self.last = f"{Path(name).name}: {stage}"
        self._draw()

    def line(self, text: str, stream: Any = None) -> None:
        self._clear()
        print(text, file=stream or sys.stdout, flush=True)
        self._draw()

    def finished(self, text: str) -> None:
        self.done += 1
        self.line(text)


class _ConsoleLog(logging.Handler):
    def __init__(self, console: _Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.line(f"imgworker: {record.getMessage()}", sys.stderr)


def describe(r: FileResult) -> str:
    """One line per file, in the original client's wording."""
    name = Path(r.path).name
    if r.code == "NOT_FOUND" and r.source == "local" and r.fallback_reason is None:
        return f"Skipping {name}: no such file"
    where = "on server" if r.source == "server" else f"on client ({r.fallback_reason})"
    if not r.ok:
        return f"Processing {name} {where}... failed: {r.error} ({r.code})"
    before = int(r.result["originalFile"]["size"])
    after = int(r.result["processedFile"]["size"])
    change = (f"saved {100 * (before - after) / before:.0f}%" if after <= before and before
              else f"{human_size(after - before)} larger")
    return f"Processing {name} {where}... done -> {r.output} ({human_size(before)} -> {human_size(after)}, {change})"


def summary(results: list[FileResult], skipped: int) -> str:
    ok = [r for r in results if r.ok]
    local = sum(r.source == "local" for r in ok)
    before = sum(int(r.result["originalFile"]["size"]) for r in ok)
    after = sum(int(r.result["processedFile"]["size"]) for r in ok)
    text = f"{len(ok)} processed"
    if local and local == len(ok):
        text += " on this machine"
    elif local:
        text += f" ({len(ok) - local} on the server, {local} on this machine)"
    text += f", {len(results) - len(ok)} failed"
    if skipped:
        text += f", {skipped} skipped"
    if ok:
        text += (f"; {human_size(before)} -> {human_size(after)}, saved {human_size(before - after)}"
                 f" ({100 * (before - after) / before:.0f}%)" if before else "")
    return text


def cli(cfg: Any, args: Any) -> int:
    """``imgworker process``: exit 0 when every file was processed, 1 otherwise
    (2 for a server URL that is not one)."""
    limits = imaging.Limits.from_config(cfg)
    try:
        client = ServerApiClient(args.server or f"http://{cfg.host}:{cfg.port}", limits=limits,
                                 reconnect_wait=args.wait)
    except ValueError as exc:
        print(f"imgworker: --server: {exc}", file=sys.stderr)
        return 2
    files, skipped = expand(args.paths, limits.formats)
    console = _Console(len(files), bar=not args.json)
    root = logging.getLogger("imgworker")
    saved, root.handlers = root.handlers, [_ConsoleLog(console)]  # warnings through the console, not over the bar
    for f, why in skipped:
        if not args.json:
            console.line(f"Skipping {f}: {why}")
    if not files:
        print("imgworker: no image files found" + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
        return 1
    options = {"format": args.format, "quality": args.quality}

    def show(r: FileResult) -> None:
        console.finished(json.dumps(r.to_json()) if args.json else describe(r))

    results = []
    for f in files:
        if not f.is_file():
            results.append(FileResult(str(f), False, "local", error="No such file", code="NOT_FOUND"))
            show(results[-1])
    existing = [f for f in files if f.is_file()]
    try:
        if existing:
            if not args.local and not client.check_server_health():
                console.line(f"Server {client.server_url} unavailable: processing on this machine", sys.stderr)
            writes = client.server_limits.get("outputFormats") if not args.local else None
            if args.format and writes and args.format not in writes:
                console.line(f"imgworker: the server does not write {args.format}; it writes {', '.join(writes)}",
                             sys.stderr)
                return 2
            results += client.process_batch(existing, args.out, options, args.priority, local=args.local,
                                            progress=lambda name, stage, _d: console.stage(name, stage),
                                            on_result=show)
    finally:
        root.handlers = saved
    if client.abandoned and not args.json:
        console.line(f"imgworker: {len(client.abandoned)} job(s) left on the unreachable server could not be "
                     f"cancelled: {', '.join(sorted(client.abandoned))}", sys.stderr)
    if not args.json:
        console.line(summary(results, len(skipped)))
    return 0 if all(r.ok for r in results) else 1
