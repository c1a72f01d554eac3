"""The HTTP API: Bottle routes served by Waitress.

Data flows one way: an upload is checked (format by content, pixel and frame
limits from the header), moved under uploads/ and written as a job row; the
supervisor does the rest. The API reads supervisor state from the database
and never imports the supervisor.

One error boundary (:func:`_boundary`) maps domain errors to
``{"success": false, "error", "code"}`` with their status; unknown routes and
methods get JSON 404/405; nothing ever returns a traceback.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
import re
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import bottle

from . import config as config_mod
from . import imaging, log
from . import server as server_mod
from .clock import iso, now_ms
from .db import StoreUnavailable
from .errors import ImageError, InvalidParameter, NotFound, QueueFull, ServiceError
from .housekeeping import Housekeeper, retry_failed
from .http import JOB_ID, UPLOAD_PATHS, id_forms, body_limit, client_key, client_of, creates_work, json_error, secure
from .limits import Limits
from .metrics import Metrics, pool_summary
from .model import OPTION_RANGES, WAITING, ErrorCode, JobStatus
from .ratelimit import RateLimiter, SharedRateLimiter
from .server import Refusal, RequestHead, free_bytes
from .storage import Storage, fsync_dir
from .store import Job, JobStore, NewJob, SupervisorRow, open_store
from .uploads import Form, UploadedFile, read_form
from .views import activity_view, failure_view, job_view, stats_view

LOG = log.get("api")
HEALTH_STALE_MS = 5000
STORAGE_CHECK_S = 2.0  # how long a check of the data directories' writability is reused
STORAGE_RETRY_AFTER_S = 30
STORE_TROUBLE_S = 30.0      # health reports a refused write for this long after it
STORE_RETRY_AFTER_S = 5     # Retry-After of a 503 SERVICE_UNAVAILABLE
RATE_LIMITED_TEXT = "Too many requests from this address; try again later"
DRAIN_S = 10  # on SIGTERM, in-flight requests get this long to finish
STATIC = Path(__file__).resolve().parent / "static"


class Api:
    """The application; ``self.wsgi`` is what Waitress serves."""

    def __init__(self, cfg: config_mod.Config, store: JobStore | None = None):
        self.cfg = cfg
        self.store = store or open_store(cfg, role="imgworker-api")
        self.storage = Storage.for_config(cfg)
        self.storage.ensure()
        self.limits = Limits.from_config(cfg)
        # one VM: counted in memory; several nodes on PostgreSQL: counted in the database
        self.ratelimit = (SharedRateLimiter(cfg.rate_limit_max_requests, cfg.rate_limit_window_ms / 1000, self.store)
                          if cfg.database_url else
                          RateLimiter(cfg.rate_limit_max_requests, cfg.rate_limit_window_ms / 1000))
        self.metrics = Metrics()
        self.started = time.monotonic()
        self._avg: tuple[float, int] = (0.0, 0)
        self._storage: tuple[float, list[str]] = (-STORAGE_CHECK_S, [])  # (checked at, problems)
        self._store_trouble: tuple[float, str] | None = None  # (monotonic, reason) of the last refused write
        self.app = bottle.Bottle()
        self.app.config["catchall"] = False  # our boundary handles errors; never a traceback page
        self.app.install(self._boundary)
        self._routes()
        self.wsgi = secure(self.app, cfg, self.metrics)

    # -- the error boundary -------------------------------------------------------
    def _boundary(self, callback: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except ServiceError as exc:
                self.metrics.rejected(exc.code)
                LOG.info("Refused %s %s: %s (%s)%s", bottle.request.method, bottle.request.path, exc.message, exc.code,
                         f"; {exc.detail}" if getattr(exc, "detail", None) else "")
                headers = {}
                if exc.code == ErrorCode.QUEUE_FULL:
                    headers["Retry-After"] = str(self._retry_after_s())
                return self._error(exc.status, exc.message, exc.code, headers)
            except OSError as exc:
                if bottle.request.path not in UPLOAD_PATHS:
                    LOG.exception("Unhandled error on %s %s", bottle.request.method, bottle.request.path)
                    return self._error(500, "Internal server error", "INTERNAL_ERROR")
                # The upload could not be written (read-only or full disk, permissions, no
                # inodes): the server's fault and transient, so 503 with Retry-After, and
                # admission refuses further uploads until a check passes again.
                self._storage_problems(refresh=True)  # logs what is unwritable; admission uses it
                LOG.error("Upload not stored on %s: %s: %s", bottle.request.path, type(exc).__name__, exc)
                return self._error(503, "The server cannot store uploads right now; try again later",
                                   "STORAGE_UNAVAILABLE", {"Retry-After": str(STORAGE_RETRY_AFTER_S)})
            except StoreUnavailable as exc:
                # locked past the wait, disk full, server gone: nothing was
                # written (uploads were removed with the rolled-back rows)
                self._store_trouble = (time.monotonic(), str(exc))
                self.metrics.rejected(ErrorCode.SERVICE_UNAVAILABLE)
                LOG.error("Refused %s %s: %s", bottle.request.method, bottle.request.path, exc)
                return self._error(503, "The service cannot store jobs right now; try again later",
                                   ErrorCode.SERVICE_UNAVAILABLE, {"Retry-After": str(STORE_RETRY_AFTER_S)})
            except Exception:
                LOG.exception("Unhandled error on %s %s", bottle.request.method, bottle.request.path)
                return self._error(500, "Internal server error", "INTERNAL_ERROR")

        return wrapper

    def _error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None,
               **extra: Any) -> bottle.HTTPResponse:
        body, hdrs = json_error(status, message, code, **extra)
        hdrs.update(self._extra_headers())
        hdrs.update(headers or {})
        return bottle.HTTPResponse(body, status, **hdrs)

    def _json(self, status: int, payload: dict[str, Any]) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(json.dumps(payload), status, **{"Content-Type": "application/json",
                                                                   "Cache-Control": "no-store",
                                                                   **self._extra_headers()})

    @staticmethod
    def _extra_headers() -> dict[str, str]:
        """Headers gathered while handling this request (RateLimit-*)."""
        return bottle.request.environ.get("imgworker.headers", {})

    # -- routes -------------------------------------------------------------------------
    def _routes(self) -> None:
        r = self.app.route
        r("/api/process/single", "POST", self.process_single)
        r("/api/process/batch", "POST", self.process_batch)
        r("/api/job/<job_id>", "GET", self.get_job)
        r("/api/job/<job_id>", "DELETE", self.cancel_job)
        r("/api/job/<job_id>/retry", "POST", self.retry_job)
        r("/api/batch/<batch_id>", "GET", self.get_batch)
        r("/api/batch/<batch_id>/download", "GET", self.download_batch)
        r("/api/dashboard", "GET", self.get_dashboard)
        r("/dashboard", "GET", self.get_dashboard_page)
        r("/api/images/<filename>", ["GET", "HEAD"], self.get_image)
        r("/api/stats", "GET", self.get_stats)
        r("/api/health", "GET", self.get_health)
        r("/api/openapi.json", "GET", self.get_openapi)
        r("/metrics", "GET", self.get_metrics)
        r("/", "GET", self.get_page)
        r("/static/<name>", "GET", self.get_static)
        for code, text in ((400, "Bad request"), (404, "Not found"), (405, "Method not allowed"),
                           (500, "Internal server error")):
            self.app.error(code)(self._http_error(code, text))

    def _http_error(self, status: int, text: str) -> Callable:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "INVALID_PARAMETER"}.get(status, "INTERNAL_ERROR")

        def handler(err: bottle.HTTPError) -> str:
            bottle.response.content_type = "application/json"
            if status == 405 and err.headers.get("Allow"):
                bottle.response.set_header("Allow", err.headers["Allow"])
            return json_error(status, f"{text}: {bottle.request.method} {bottle.request.path}"
                              if status in (404, 405) else text, code)[0]

        return handler

    # -- admission: decided on the request headers, before the body is read ----------
    def admit(self, head: RequestHead) -> Refusal | None:
        """Refuse a work-creating request whose client has nothing left in
        its rate-limit window, and an upload the disk has no room for.
        Called by the server's I/O thread: only in-memory and statvfs work."""
        if not creates_work(head.method, head.path):
            return None
        blocked = self.ratelimit.blocked(self._client(head))
        if blocked is not None:
            return Refusal(ErrorCode.RATE_LIMITED, RATE_LIMITED_TEXT,
                           {"Retry-After": blocked["RateLimit-Reset"], **blocked})
        if head.path in UPLOAD_PATHS:
            problems = self._storage_problems(refresh=bool(self._storage[1]))  # I/O only while it is failing
            if problems:
                return Refusal(ErrorCode.STORAGE_UNAVAILABLE,
                               "The server cannot store uploads right now; try again later",
                               {"Retry-After": str(STORAGE_RETRY_AFTER_S)})
            need = head.content_length if head.content_length is not None else body_limit(
                head.method, head.path, self.cfg)
            free = free_bytes(str(self.storage.root), tempfile.gettempdir())
            if free - need < self.cfg.min_free_disk_mb * 2**20:
                LOG.warning("Upload refused: %d MB free, MIN_FREE_DISK_MB=%d", free // 2**20,
                            self.cfg.min_free_disk_mb)
                return Refusal(ErrorCode.INSUFFICIENT_STORAGE, "The server is low on disk space; try again later",
                               {"Retry-After": "60"})
        return None

    def charge(self, head: RequestHead) -> None:
        """An upload refused for its size costs its client one request."""
        if creates_work(head.method, head.path):
            self.ratelimit.take(self._client(head), 1)

    def _client(self, head: RequestHead) -> str:
        return client_key(head.peer, head.headers.get("X_FORWARDED_FOR"), self.cfg.trust_proxy)

    # -- uploads ----------------------------------------------------------------------
    @staticmethod
    def _requester() -> str:
        """The requesting client's key (REMOTE_ADDR: Waitress sets it from
        X-Forwarded-For only with TRUST_PROXY): what the rate limit counts
        and what the claim shares the pool by."""
        return client_of(bottle.request.environ.get("REMOTE_ADDR", "?"))

    def _take(self, wanted: int) -> int:
        """Count ``wanted`` jobs against the client's rate limit; how many
        fit (429 when none does). The client address is REMOTE_ADDR:
        Waitress sets it from X-Forwarded-For only with TRUST_PROXY."""
        granted, headers = self.ratelimit.take(self._requester(), wanted)
        bottle.request.environ["imgworker.headers"] = headers
        if not granted:
            self.metrics.rejected("RATE_LIMITED")
            raise self._error(429, RATE_LIMITED_TEXT, "RATE_LIMITED", {"Retry-After": headers["RateLimit-Reset"]})
        return granted

    def _options(self, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
        def integer(name: str, lo: int, hi: int) -> int | None:
            raw = fields.get(name, "").strip()
            if raw == "":
                return None
            if not re.fullmatch(r"[+-]?\d{1,9}", raw) or not lo <= int(raw) <= hi:
                raise InvalidParameter(f"'{name}' must be a whole number from {lo} to {hi} (got {raw[:30]!r})")
            return int(raw)

        # a client may lower its jobs' priority freely but raise it only to
        # MAX_CLIENT_PRIORITY: no anonymous client jumps everyone else
        priority = min(integer("priority", *OPTION_RANGES["priority"]) or 0, self.cfg.max_client_priority)
        options: dict[str, Any] = {}
        fmt = fields.get("format", "").strip().lower()
        if fmt:
            fmt = {"jpg": "jpeg"}.get(fmt, fmt)
            if fmt not in config_mod.OUTPUT_FORMATS:
                raise InvalidParameter(f"'format' must be one of {', '.join(config_mod.OUTPUT_FORMATS)} (got {fmt[:30]!r})")
            options["format"] = fmt
        for name in ("quality", "maxWidth", "maxHeight"):
            value = integer(name, *OPTION_RANGES[name])
            if value is not None:
                options[name] = value
        return priority, options

    def _read(self, file_fields: tuple[str, ...], max_files: int) -> Form:
        """The parsed body (its size was held to the route's limit by the server)."""
        return read_form(bottle.request.environ, self.storage.tmp, file_fields, self.cfg.max_file_bytes, max_files)

    def _too_large_text(self) -> str:
        return f"The file is larger than the {self.cfg.max_file_size_mb:g} MB limit"

    def _check(self, upload: UploadedFile) -> imaging.Probe:
        if upload.too_large:
            raise ImageError("FILE_TOO_LARGE", self._too_large_text())
        if upload.size == 0:
            raise ImageError("INVALID_IMAGE", "The file is empty")
        return imaging.probe(upload.path, self.limits)

    def _stage(self, upload: UploadedFile, info: imaging.Probe, priority: int, options: dict[str, Any],
               batch_id: str | None) -> tuple[NewJob, UploadedFile]:
        """A job for a checked upload, named by a new job id; the file stays
        in tmp/ until :meth:`_enqueue` moves it in the row's transaction."""
        job_id = str(uuid.uuid4())
        options = self._resolve_auto(options, info)
        with open(upload.path, "rb") as fh:
            os.fsync(fh.fileno())  # the job row promises the bytes are on disk
        job = NewJob(job_id, str(self.storage.upload_path(job_id, info.format)), upload.filename, upload.size,
                     info.format, priority, options, batch_id, client=self._requester())
        return job, upload

    def _resolve_auto(self, options: dict[str, Any], info: imaging.Probe) -> dict[str, Any]:
        """``format=auto`` (asked for, or the OUTPUT_FORMAT default) becomes
        the best format this client's Accept header takes, decided now and
        recorded on the job: the worker never sees the request."""
        if (options.get("format") or self.cfg.output_format) != "auto":
            return options
        accept = bottle.request.get_header("Accept", "")[:1000]
        chosen = imaging.output_format("auto", info, accept)
        return {**options, "format": chosen, "formatRequested": "auto", "accept": accept[:200]}

    def _enqueue(self, staged: list[tuple[NewJob, UploadedFile]]) -> list[int]:
        """Write the rows and move the uploads into uploads/ in one
        transaction: a crash leaves either both or neither (a temp file of a
        dead process is swept by cleanup)."""
        jobs = [job for job, _ in staged]
        moved: list[str] = []

        def move_uploads() -> None:
            for job, upload in staged:
                self.storage.move_in(Path(upload.path), Path(job.input_path))
                upload.path = Path(job.input_path)
                moved.append(job.input_path)
            fsync_dir(self.storage.uploads)  # the renames survive a power cut, like the rows

        try:
            positions = self.store.enqueue(jobs, self.cfg.max_queue_size, self.cfg.max_attempts,
                                           before_commit=move_uploads)
        except BaseException:
            for path in moved:  # the transaction rolled back: so do the files
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        self._store_trouble = None  # writes work again
        self.store.notify()
        self.metrics.accepted(len(jobs), sum(j.input_size for j in jobs))
        return positions

    def _estimate(self, position: int) -> int:
        """ms until done: average processing time x (rounds of the pool ahead + 1)."""
        avg = self._average_ms()
        workers = max(1, self.cfg.max_concurrent_jobs)
        return int(avg * (math.ceil(position / workers) + 1)) if position else int(avg)

    def _average_ms(self) -> float:
        at, value = self._avg
        if time.monotonic() - at > 2:
            value = self.store.stats().average_processing_ms or 2000
            self._avg = (time.monotonic(), value)
        return value

    def _retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: one job's time on the pool."""
        per_slot = self._average_ms() / max(1, self.cfg.max_concurrent_jobs) / 1000
        return max(1, min(60, math.ceil(per_slot)))

    def process_single(self) -> bottle.HTTPResponse:
        form = self._read(("image",), 1)
        try:
            if not form.files:
                raise ServiceError("No file uploaded: send the image in the multipart field 'image'", ErrorCode.NO_FILE)
            self._take(1)
            priority, options = self._options(form.fields)
            upload = form.files[0]
            info = self._check(upload)
            staged = self._stage(upload, info, priority, options, None)
            (position,) = self._enqueue([staged])
            job = staged[0]
        except BaseException:
            form.discard()
            raise
        form.files.clear()  # now owned by the job
        LOG.info("Job queued: %s (%s, %d bytes, priority %d)", job.original_name, info.format, job.input_size,
                 priority, extra={"job": job.id})
        return self._json(202, {
            "success": True, "jobId": job.id, "estimatedTime": self._estimate(position),
            "queuePosition": position, "message": "Image processing job queued successfully",
            "statusUrl": f"/api/job/{job.id}",
        })

    def process_batch(self) -> bottle.HTTPResponse:
        form = self._read(("images", "image"), self.cfg.batch_max_files)
        staged: list[tuple[NewJob, UploadedFile]] = []
        rejected: list[dict[str, Any]] = []
        try:
            if not form.files:
                raise ServiceError("No files uploaded: send the images in the multipart field 'images'", ErrorCode.NO_FILE)
            priority, options = self._options(form.fields)
            granted = self._take(len(form.files))  # each file is a job: a batch of N counts N
            batch_id = str(uuid.uuid4())
            first_error: ServiceError | None = None
            indexes = []
            for index, upload in enumerate(form.files):
                try:
                    if index >= granted:
                        raise ServiceError(RATE_LIMITED_TEXT, ErrorCode.RATE_LIMITED)
                    info = self._check(upload)
                except ServiceError as exc:
                    upload.discard()
                    self.metrics.rejected(exc.code)
                    LOG.info("Refused %r in a batch: %s (%s)%s", upload.filename[:100], exc.message, exc.code,
                             f"; {exc.detail}" if getattr(exc, "detail", None) else "")
                    rejected.append({"filename": upload.filename, "error": exc.message, "code": exc.code,
                                     "index": index})
                    first_error = first_error or exc
                    continue
                staged.append(self._stage(upload, info, priority, options, batch_id))
                indexes.append(index)
            if not staged:
                assert first_error is not None
                return self._error(first_error.status, "No file in the batch could be accepted",
                                   first_error.code, rejected=rejected)
            try:
                positions = self._enqueue(staged)
            except QueueFull:
                staged, indexes = self._fit_queue(staged, indexes, rejected)
                positions = self._enqueue(staged)  # full again (a race): 503 for all, as before
        except BaseException:
            form.discard()
            raise
        form.files.clear()  # now owned by the jobs
        LOG.info("Batch queued: %d jobs, %d rejected", len(staged), len(rejected), extra={"job": batch_id})
        jobs = [{"jobId": job.id, "filename": job.original_name, "estimatedTime": self._estimate(pos),
                 "queuePosition": pos, "statusUrl": f"/api/job/{job.id}", "index": index}
                for (job, _), pos, index in zip(staged, positions, indexes, strict=True)]
        return self._json(202, {
            "success": True, "batchId": batch_id, "jobs": jobs, "rejected": rejected,
            "message": f"{len(staged)} image(s) queued" + (f", {len(rejected)} rejected" if rejected else ""),
            "statusUrl": f"/api/batch/{batch_id}",
        })

    def _fit_queue(self, staged: list[tuple[NewJob, UploadedFile]], indexes: list[int],
                   rejected: list[dict[str, Any]]) -> tuple[list[tuple[NewJob, UploadedFile]], list[int]]:
        """A batch larger than the room left in the queue: keep what fits and
        list the rest under ``rejected`` with QUEUE_FULL (a retry of the whole
        batch could never succeed). No room at all: QueueFull (503) as usual."""
        free = self.cfg.max_queue_size - self.store.stats().waiting
        if free <= 0:
            raise QueueFull(f"The queue is full ({self.cfg.max_queue_size} jobs waiting); try again later")
        for (job, upload), index in zip(staged[free:], indexes[free:]):
            upload.discard()
            self.metrics.rejected(ErrorCode.QUEUE_FULL)
            rejected.append({"filename": upload.filename, "code": ErrorCode.QUEUE_FULL, "index": index,
                             "error": f"The queue had room for {free} of the {len(staged)} files; send this one again later"})
        rejected.sort(key=lambda r: r["index"])
        return staged[:free], indexes[:free]

    # -- jobs ---------------------------------------------------------------------------
    def _job_view(self, job: Job) -> dict[str, Any]:
        position = self.store.queue_position(job) if job.status in WAITING else None
        return job_view(job, position)

    def _find(self, job_id: str) -> Job:
        job = next(filter(None, map(self.store.get, id_forms(job_id))), None) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise NotFound(f"Job {job_id[:64]} not found")
        return job

    def get_job(self, job_id: str) -> bottle.HTTPResponse:
        return self._json(200, self._job_view(self._find(job_id)))

    def cancel_job(self, job_id: str) -> bottle.HTTPResponse:
        job = self._find(job_id)
        self.store.cancel(job.id)
        self.storage.discard_upload(job.input_path)  # a cancelled job is never retried
        LOG.info("Job cancelled", extra={"job": job.id})
        return self._json(200, {"success": True, "jobId": job.id, "status": "cancelled"})

    def retry_job(self, job_id: str) -> bottle.HTTPResponse:
        self._take(1)
        job_id = self._find(job_id).id
        retry_failed(self.store, job_id, self.cfg.max_queue_size)
        self.store.notify()
        LOG.info("Job sent back to the queue by request", extra={"job": job_id})
        return self._json(202, {"success": True, "jobId": job_id, "status": "queued"})

    def _batch(self, batch_id: str) -> list[Job]:
        """The batch's jobs, found by either id form (see id_forms)."""
        if not JOB_ID.fullmatch(batch_id):
            return []
        return next(filter(None, map(self.store.batch, id_forms(batch_id))), [])

    def get_batch(self, batch_id: str) -> bottle.HTTPResponse:
        jobs = self._batch(batch_id)
        if not jobs:
            raise NotFound(f"Batch {batch_id[:64]} not found")
        count = lambda *s: sum(j.status in s for j in jobs)  # noqa: E731
        return self._json(200, {
            "batchId": jobs[0].batch_id, "total": len(jobs), "queued": count("queued", "retrying"),
            "processing": count("processing"), "completed": count("completed"), "failed": count("failed"),
            "cancelled": count("cancelled"), "done": count("completed", "failed", "cancelled") == len(jobs),
            "jobs": [self._job_view(j) for j in jobs],
        })

    def download_batch(self, batch_id: str) -> bottle.HTTPResponse:
        """A zip of the batch's completed outputs, streamed (see bundle.py)."""
        from .bundle import entry_names, stream_zip

        jobs = self._batch(batch_id)
        if not jobs:
            raise NotFound(f"Batch {batch_id[:64]} not found")
        pairs = []
        for job in jobs:
            path = self.storage.output_file(Path(job.output_path).name) if job.status == JobStatus.COMPLETED \
                and job.output_path else None
            if path is not None:  # only files the service wrote, inside processed/
                pairs.append((job.original_name, path))
        if not pairs:
            raise ServiceError("No file of this batch has been processed yet", ErrorCode.CONFLICT)
        return bottle.HTTPResponse(stream_zip(entry_names(pairs)), 200, **{
            "Content-Type": "application/zip", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="images-{batch_id[:8]}.zip"'})

    def get_image(self, filename: str) -> Any:
        path = self.storage.output_file(filename)
        if path is None:
            raise NotFound("Image not found")
        st = path.stat()
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable",
                   "Cross-Origin-Resource-Policy": "cross-origin"}
        if etag in [t.strip() for t in bottle.request.headers.get("If-None-Match", "").split(",")]:
            return bottle.HTTPResponse(status=304, **headers)
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        headers.update({"Content-Type": mime, "Content-Length": str(st.st_size),
                        "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(st.st_mtime))})
        if bottle.request.method == "HEAD":
            return bottle.HTTPResponse("", 200, **headers)
        fh = open(path, "rb")
        wrapper = bottle.request.environ.get("wsgi.file_wrapper")
        body = wrapper(fh, 256 * 1024) if wrapper else fh
        return bottle.HTTPResponse(body, 200, **headers)

    # -- service state ------------------------------------------------------------------
    def _supervisors(self) -> tuple[list[SupervisorRow], list[SupervisorRow]]:
        """(live, all) supervisor rows; live = heartbeat within HEALTH_STALE_MS."""
        rows = self.store.supervisors()
        now = now_ms()
        return [s for s in rows if now - s.heartbeat_at <= HEALTH_STALE_MS], rows

    def _stats(self, live: list[SupervisorRow]) -> dict[str, Any]:
        """/api/stats: the queue's statistics and what the live supervisors report."""
        stats = stats_view(self.store.stats())
        states = [s.state for s in live]
        stats.update({
            **pool_summary(states),
            "memory": states[0].get("memory", {}) if states else {},
            "uptime": round(time.monotonic() - self.started, 1),
            "supervisors": len(live),
        })
        return stats

    def get_stats(self) -> bottle.HTTPResponse:
        return self._json(200, self._stats(self._supervisors()[0]))

    def get_dashboard(self) -> bottle.HTTPResponse:
        """The dashboard's data in one answer: /api/stats, the supervisors'
        full state (pool, counters, memory: what /metrics reads), the queue by
        priority, the last hour per minute and the latest failures."""
        live, _ = self._supervisors()
        stats = self._stats(live)
        now = now_ms()
        return self._json(200, {
            "now": now, "stats": stats, "maxQueueSize": self.cfg.max_queue_size,
            "memoryMarks": {"pause": self.cfg.memory_pause_percent, "resume": self.cfg.memory_resume_percent},
            "supervisors": [{"id": s.id, "host": s.hostname, "pid": s.pid,
                             "heartbeatAgeMs": now - s.heartbeat_at, "state": s.state} for s in live],
            "byPriority": [asdict(p) for p in self.store.waiting_by_priority()],
            "activity": [activity_view(m) for m in self.store.activity(now - 3_600_000)],
            "recentFailures": [failure_view(j) for j in self.store.recent_failures(10)],
        })

    def get_dashboard_page(self) -> Any:
        return self.get_static("dashboard.html")

    def _storage_problems(self, refresh: bool) -> list[str]:
        """Data directories that cannot be written (Storage.unwritable),
        checked at most every STORAGE_CHECK_S; without ``refresh`` only the
        last result."""
        at, problems = self._storage
        if refresh and time.monotonic() - at >= STORAGE_CHECK_S:
            problems = self.storage.unwritable()
            if problems != self._storage[1]:
                if problems:
                    LOG.error("Data directory not writable: %s", "; ".join(problems))
                else:
                    LOG.info("Data directory writable again")
            self._storage = (time.monotonic(), problems)
        return problems

    def get_health(self) -> bottle.HTTPResponse:
        try:
            live, rows = self._supervisors()
        except Exception as exc:
            return self._json(503, {"status": "unavailable", "reason": f"database unreachable: {type(exc).__name__}",
                                    "database": "error"})
        payload: dict[str, Any] = {"database": "ok", "uptime": round(time.monotonic() - self.started, 1),
                                   "limits": self._public_limits()}
        problems = self._storage_problems(refresh=True)
        payload["storage"] = problems or "ok"
        if problems:
            payload.update(status="degraded", reason="cannot write to the data directory: " + "; ".join(problems)
                           + " (uploads get 503, jobs wait and retry)")
            return self._json(503, payload)
        trouble = self._store_trouble
        if trouble is not None and time.monotonic() - trouble[0] < STORE_TROUBLE_S:
            payload.update(status="degraded", database="unavailable", reason=f"the database refused a write "
                           f"{time.monotonic() - trouble[0]:.0f} s ago ({trouble[1]}): uploads get 503")
            return self._json(503, payload)
        if not live:
            last = max((s.heartbeat_at for s in rows), default=None)
            payload.update(status="degraded", reason="no supervisor has reported in the last "
                           f"{HEALTH_STALE_MS // 1000} s: jobs are accepted but not processed",
                           lastHeartbeat=iso(last))
            return self._json(503, payload)
        states = [s.state for s in live]
        payload.update(status="ok", **pool_summary(states), lastHeartbeat=iso(max(s.heartbeat_at for s in live)))
        if not payload["workers"]["alive"]:
            boot_errors = [st["lastBootError"] for st in states if st.get("lastBootError")]
            payload.update(status="degraded", reason="no worker process is alive: jobs are accepted but not processed"
                           + (f" ({boot_errors[0]})" if boot_errors else ""))
            return self._json(503, payload)
        return self._json(200, payload)

    def _public_limits(self) -> dict[str, Any]:
        """What a client needs to process the same way when we are down."""
        c = self.cfg
        return {"maxWidth": c.max_image_width, "maxHeight": c.max_image_height, "quality": c.compression_quality,
                "maxFileSizeMb": c.max_file_size_mb, "batchMaxFiles": c.batch_max_files,
                "formats": list(c.supported_formats), "outputFormat": c.output_format,
                "outputFormats": list(config_mod.OUTPUT_FORMATS), "avifSpeed": c.avif_speed}

    def get_metrics(self) -> bottle.HTTPResponse:
        live, _ = self._supervisors()
        text = self.metrics.render(stats_view(self.store.stats()), [s.state for s in live])
        return bottle.HTTPResponse(text, 200, **{"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                                 "Cache-Control": "no-store"})

    def get_openapi(self) -> bottle.HTTPResponse:
        from .openapi import document

        return self._json(200, document(self.cfg))

    def get_page(self) -> Any:
        return self.get_static("index.html")

    def get_static(self, name: str) -> Any:
        if not re.fullmatch(r"[a-z0-9_-]+\.(html|js|css)", name) or not (STATIC / name).is_file():
            raise NotFound("Not found")
        response = bottle.static_file(name, root=str(STATIC))
        response.set_header("Cache-Control", "no-cache")
        return response


def make_server(cfg: config_mod.Config, api: Api | None = None, port: int | None = None) -> server_mod.Server:
    """The hardened Waitress server for the API (see imgworker.server),
    listening on HOST:PORT (``port`` overrides); ``server.api`` is the app."""
    api = api or Api(cfg)
    server = server_mod.build(api.wsgi, cfg, api, api.metrics, port)
    server.api = api
    return server


# Settings the API reads once at start (the listening socket, the limits
# built into the server and the middleware); the rest take effect on SIGHUP.
START_ONLY = ("HOST", "PORT", "DATA_DIR", "DATABASE_PATH", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS",
              "CORS_ORIGINS", "TRUST_PROXY", "NODE_ENV", "APP_ENV", "MAX_FILE_SIZE_MB", "BATCH_MAX_FILES",
              "MAX_CONNECTIONS")


def _reload(api: Api) -> None:
    """SIGHUP: re-read the settings and apply those the API reads per request
    (queue bound, pixel limits, formats, log level...); the log line lists
    what changed and names the START_ONLY ones that need a restart."""
    try:
        cfg = config_mod.load()
    except config_mod.ConfigError as exc:
        LOG.error("Reload refused, keeping the running settings: %s", exc)
        return
    changed = config_mod.changes(api.cfg, cfg)
    values = {**cfg.values, **{k: api.cfg.values[k] for k in START_ONLY if k in api.cfg.values}}
    api.cfg = config_mod.Config(values)
    api.limits = Limits.from_config(api.cfg)
    log.setup(api.cfg.log_level, api.cfg.log_format)
    LOG.info("Settings reloaded: %s", "; ".join(changed) if changed else "nothing changed")
    later = [c.split()[0] for c in changed if c.split()[0] in START_ONLY]
    if later:
        LOG.warning("%s: read at start only; restart the API to apply", ", ".join(later))


NODE_HEARTBEAT_S = 2.0


def _register_node(api: Api, stop: threading.Event) -> str | None:
    """On a store shared by several nodes (PostgreSQL), register this API
    process as a node and keep its heartbeat from a small thread until
    ``stop``; returns the node id (None on SQLite: one VM, nothing to share)."""
    register = getattr(api.store, "register_api", None)
    if register is None:
        return None
    node_id = f"{api.cfg.node_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    started = now_ms()

    def beat() -> None:
        while True:
            try:
                register(node_id, api.cfg.node_name, os.getpid(), started)
            except Exception as exc:  # the database is away: the store reconnects; try again
                LOG.warning("Node heartbeat failed: %s", exc)
            if stop.wait(NODE_HEARTBEAT_S):
                return

    threading.Thread(target=beat, name="node-heartbeat", daemon=True).start()
    return node_id


def run(cfg: config_mod.Config) -> int:
    """Entry point of ``imgworker api``: serve until SIGTERM/SIGINT, then stop
    accepting, let in-flight requests finish (bounded) and exit 0."""
    Storage.for_config(cfg).ensure()
    api = Api(cfg)
    api.store.migrate()
    # uploads cut off by a crash of an earlier API process, and finished jobs' uploads a crash left
    Housekeeper(api.store, api.storage).sweep_dead(finished=True)
    try:
        server = make_server(cfg, api)
    except OSError as exc:  # taken or unknown address: say which setting, do not restart-loop
        LOG.error("Cannot listen on HOST=%s PORT=%s: %s", cfg.host, cfg.port, exc.strerror or exc)
        api.store.close()
        return 2
    stop = threading.Event()

    hup = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        (hup if signum == signal.SIGHUP else stop).set()  # acted on by the loop below, never here

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    node = _register_node(api, stop)
    LOG.info("Image Processing Server running on http://%s:%s", cfg.host, server.effective_port)
    LOG.info("Max concurrent jobs: %d", cfg.max_concurrent_jobs)
    LOG.info("Job timeout: %dms", cfg.job_timeout_ms)
    while not stop.is_set():
        server.poll(0.2)
        if hup.is_set():
            hup.clear()
            _reload(api)
            server.edge.cfg = api.cfg  # deadlines and per-client limits follow the reload
    LOG.info("Stopping: finishing in-flight requests")
    server.stop_listening()
    server.drain(DRAIN_S)
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
    if node is not None:
        try:
            api.store.remove_supervisors([node])
        except Exception:
            LOG.exception("Could not unregister the node")
    api.store.close()
    LOG.info("API stopped")
    return 0
