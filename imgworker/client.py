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

import http.client
import json
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

LOG = log.get("client")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".mpo"}
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


@dataclass
class ServerApiClient:
    """``server_url``, ``poll_interval`` (s), ``max_poll_time`` (s), as in the original."""

    server_url: str = "http://127.0.0.1:3001"
    poll_interval: float = 0.5
    max_poll_time: float = 180.0
    timeout: float = 30.0
    health_timeout: float = 2.0
    health_ttl: float = 30.0
    limits: imaging.Limits = field(default_factory=imaging.Limits)
    _health: tuple[float, bool] | None = field(default=None, repr=False)

    # -- HTTP -----------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
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
        ``health_ttl`` seconds (a failure during work resets it)."""
        now = time.monotonic()
        if not refresh and self._health and now - self._health[0] < self.health_ttl:
            return self._health[1]
        try:
            status, _, _ = self._request("GET", "/api/health", timeout=self.health_timeout)
            healthy = status == 200
        except ServerUnavailable:
            healthy = False
        self._health = (now, healthy)
        LOG.info("Server-side image processing %s", "available" if healthy else "unavailable")
        return healthy

    def _post_upload(self, path: str, files: list[tuple[str, str, bytes]], fields: dict[str, str]) -> tuple[int, Any]:
        body, ctype = _multipart(files, fields)
        for attempt in range(2):
            status, headers, data = self._json("POST", path, body=body, headers={"Content-Type": ctype})
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
        if local:
            return self.process_locally(path, out_dir, options, "requested", notify)
        if not self.check_server_health():
            return self.process_locally(path, out_dir, options, "server unavailable", notify)
        try:
            LOG.info("Processing %s on server...", path.name)
            notify(str(path), "uploading", {})
            status, data = self._post_upload("/api/process/single", [("image", path.name, path.read_bytes())],
                                             self._fields(options, priority))
            if status != 202:
                notify(str(path), "failed", data)
                return FileResult(str(path), False, error=data.get("error"), code=data.get("code"))
            notify(str(path), "queued", {"queuePosition": data.get("queuePosition")})
            job = self._wait(data["jobId"], lambda j: notify(str(path), j["status"], j))
            return self._finish(path, out_dir, job, notify)
        except ServerUnavailable as exc:
            self._health = None
            return self.process_locally(path, out_dir, options, f"server unavailable ({exc})", notify)

    def _wait(self, job_id: str, on_change: Callable[[dict], None]) -> dict[str, Any]:
        deadline = time.monotonic() + self.max_poll_time
        last = None
        while True:
            status, _, job = self._json("GET", f"/api/job/{job_id}")
            if status != 200:
                raise ServerUnavailable(f"job status answered HTTP {status}")
            if job["status"] != last:
                last = job["status"]
                on_change(job)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"job not finished after {self.max_poll_time:g} s")
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
        LOG.info("Server processing completed: %s", dest.name)
        return FileResult(str(path), True, "server", str(dest), result)

    def process_locally(self, path: Path, out_dir: Path, options: dict[str, Any], reason: str,
                        notify: Progress | None = None) -> FileResult:
        """The same pipeline, here. ``reason`` says why (shown to the user)."""
        notify = notify or (lambda *_: None)
        LOG.info("Processing %s on client (%s)", path.name, reason)
        notify(str(path), "processing", {"source": "local"})
        tmp = Path(tempfile.mkdtemp(prefix="imgworker-client-"))
        try:
            result = imaging.process(path, tmp, uuid.uuid4().hex, options, self.limits, path.name)
            out_dir.mkdir(parents=True, exist_ok=True)
            produced = tmp / result["processedFile"]["filename"]
            dest = unique_path(out_dir, f"{path.stem}{produced.suffix}")
            shutil.move(str(produced), dest)
            result["processedFile"].update(filename=dest.name, url=None)
            notify(str(path), "done", result)
            return FileResult(str(path), True, "local", str(dest), result, fallback_reason=reason)
        except ImageError as exc:
            notify(str(path), "failed", {"error": exc.message, "code": exc.code})
            return FileResult(str(path), False, "local", error=exc.message, code=exc.code, fallback_reason=reason)
        except OSError as exc:
            return FileResult(str(path), False, "local", error=str(exc), code="IO_ERROR", fallback_reason=reason)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- batches ---------------------------------------------------------------------
    def process_batch(self, paths: list[str | Path], out_dir: str | Path = ".", options: dict[str, Any] | None = None,
                      priority: int = 0, progress: Progress | None = None, local: bool = False,
                      batch_size: int = 20) -> list[FileResult]:
        """Process many files through the batch endpoint (``batch_size`` per
        request), calling ``progress(file, stage, details)`` as each file moves
        through uploading -> queued -> processing -> done/failed."""
        paths = [Path(p) for p in paths]
        out_dir = Path(out_dir)
        notify = progress or (lambda *_: None)
        options = dict(options or {})
        results: dict[str, FileResult] = {}
        for start in range(0, len(paths), batch_size):
            group = paths[start : start + batch_size]
            if local or not self.check_server_health():
                reason = "requested" if local else "server unavailable"
                for p in group:
                    results[str(p)] = self.process_locally(p, out_dir, options, reason, notify)
                continue
            try:
                results.update(self._server_batch(group, out_dir, options, priority, notify))
            except ServerUnavailable as exc:
                self._health = None
                for p in group:
                    if str(p) not in results:
                        results[str(p)] = self.process_locally(p, out_dir, options, f"server unavailable ({exc})", notify)
        return [results[str(p)] for p in paths]

    def _server_batch(self, group: list[Path], out_dir: Path, options: dict[str, Any], priority: int,
                      notify: Progress) -> dict[str, FileResult]:
        for p in group:
            LOG.info("Processing %s on server...", p.name)
            notify(str(p), "uploading", {})
        files = [("images", p.name, p.read_bytes()) for p in group]
        status, data = self._post_upload("/api/process/batch", files, self._fields(options, priority))
        out: dict[str, FileResult] = {}
        if status != 202:  # every file refused: the body lists them
            rejected = {r.get("index"): r for r in data.get("rejected") or []}
            for i, p in enumerate(group):
                r = rejected.get(i, {"error": data.get("error"), "code": data.get("code")})
                notify(str(p), "failed", r)
                out[str(p)] = FileResult(str(p), False, error=r.get("error"), code=r.get("code"))
            return out
        # every accepted job and rejected file carries its index in the upload
        job_of: dict[str, str] = {}
        for job in data["jobs"]:
            path = str(group[job["index"]])
            job_of[job["jobId"]] = path
            notify(path, "queued", {"queuePosition": job.get("queuePosition")})
        for r in data["rejected"]:
            path = str(group[r["index"]])
            notify(path, "failed", r)
            out[path] = FileResult(path, False, error=r["error"], code=r["code"])
        seen: dict[str, str] = {}
        deadline = time.monotonic() + self.max_poll_time
        while len(seen) < len(job_of) or any(s not in ("completed", "failed", "cancelled") for s in seen.values()):
            code, _, batch = self._json("GET", f"/api/batch/{data['batchId']}")
            if code != 200:
                raise ServerUnavailable(f"batch status answered HTTP {code}")
            for job in batch["jobs"]:
                path = job_of[job["jobId"]]
                if seen.get(job["jobId"]) != job["status"]:
                    seen[job["jobId"]] = job["status"]
                    if job["status"] in ("completed", "failed", "cancelled"):
                        out[path] = self._finish(Path(path), out_dir, job, notify)
                    elif job["status"] == "processing":
                        notify(path, "processing", job)
            if all(s in ("completed", "failed", "cancelled") for s in seen.values()) and len(seen) == len(job_of):
                break
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"batch not finished after {self.max_poll_time:g} s")
            time.sleep(self.poll_interval)
        return out


# -- `imgworker process` ----------------------------------------------------------------
def expand(paths: list[str]) -> list[Path]:
    """Files as given, and image files in folders (recursively), in order."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                              and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            out.append(p)
    return out


class _Bar:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def update(self, name: str, stage: str) -> None:
        if not self.enabled:
            return
        if stage in ("done", "failed"):
            self.done += 1
        width = 24
        filled = int(width * self.done / max(1, self.total))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {Path(name).name}: {stage}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            if self.done == self.total and stage in ("done", "failed"):
                sys.stderr.write("\n")
        elif stage in ("done", "failed"):
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def cli(cfg: Any, args: Any) -> int:
    """``imgworker process``: exit 0 when every file was processed, 1 otherwise."""
    files = expand(args.paths)
    if not files:
        print("imgworker: no image files found", file=sys.stderr)
        return 1
    missing = [f for f in files if not f.is_file()]
    client = ServerApiClient(args.server or f"http://{cfg.host}:{cfg.port}", limits=imaging.Limits.from_config(cfg))
    options = {"format": args.format, "quality": args.quality}
    bar = _Bar(len(files), not args.json)
    results = [FileResult(str(f), False, "local", error="No such file", code="NOT_FOUND") for f in missing]
    existing = [f for f in files if f.is_file()]
    if existing:
        if not args.local and not client.check_server_health():
            print(f"Server {client.server_url} unavailable: processing on this machine", file=sys.stderr)
        results += client.process_batch(existing, args.out, options, args.priority, local=args.local,
                                        progress=lambda name, stage, _d: bar.update(name, stage))
    processed = [r for r in results if r.ok]
    for r in results:
        if args.json:
            print(json.dumps(r.to_json()))
        else:  # the original client's wording: "Processing x.jpg on server..."
            where = "on server" if r.source == "server" else f"on client ({r.fallback_reason})"
            outcome = (f"done -> {r.output} (saved {r.size_saved} bytes)" if r.ok
                       else f"failed: {r.error} ({r.code})")
            print(f"Processing {Path(r.path).name} {where}... {outcome}")
    if not args.json:
        print(f"{len(processed)} processed, {len(results) - len(processed)} failed, "
              f"{sum(r.size_saved for r in processed)} bytes saved")
    return 0 if len(processed) == len(results) else 1
