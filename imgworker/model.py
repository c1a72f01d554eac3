"""The domain vocabulary, each fact in one place: job statuses, error codes
(with their HTTP status and whether a failure with that code is retried),
the typed outcome of a processed image, and how outputs are named.

Nothing here knows HTTP routes, SQL or Pillow; the API, the store, the
supervisor, the worker and the pipeline all import their words from here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    """States of a job row (SPEC §5). ``str`` so that it compares equal to,
    and serialises as, its plain name."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
WAITING = (JobStatus.QUEUED, JobStatus.RETRYING)          # claimable once run_at has come; cancellable
FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)  # expire after the retention


class ErrorCode(str, Enum):
    """Every ``code`` a client or the job row can carry, with the HTTP status
    the API answers with and whether a job failing with it is retried
    (``transient``). Deterministic failures (the image itself is the
    problem) are never retried."""

    def __new__(cls, value: str, http_status: int, transient: bool = False) -> "ErrorCode":
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.http_status = http_status
        obj.transient = transient
        return obj

    def __str__(self) -> str:
        return self.value

    # requests
    NO_FILE = ("NO_FILE", 400)
    INVALID_PARAMETER = ("INVALID_PARAMETER", 400)
    CORS_FORBIDDEN = ("CORS_FORBIDDEN", 403)
    NOT_FOUND = ("NOT_FOUND", 404)
    METHOD_NOT_ALLOWED = ("METHOD_NOT_ALLOWED", 405)
    CONFLICT = ("CONFLICT", 409)
    FILE_TOO_LARGE = ("FILE_TOO_LARGE", 413)
    RATE_LIMITED = ("RATE_LIMITED", 429)
    QUEUE_FULL = ("QUEUE_FULL", 503)
    INTERNAL_ERROR = ("INTERNAL_ERROR", 500)
    # the HTTP edge (server.py): refused from the headers or the connection
    BAD_REQUEST = ("BAD_REQUEST", 400)
    REQUEST_TIMEOUT = ("REQUEST_TIMEOUT", 408)
    BODY_NOT_ALLOWED = ("BODY_NOT_ALLOWED", 413)
    HEADERS_TOO_LARGE = ("HEADERS_TOO_LARGE", 431)
    NOT_IMPLEMENTED = ("NOT_IMPLEMENTED", 501)
    TOO_MANY_CONNECTIONS = ("TOO_MANY_CONNECTIONS", 503)
    SERVER_BUSY = ("SERVER_BUSY", 503)
    SERVICE_UNAVAILABLE = ("SERVICE_UNAVAILABLE", 503)  # the database cannot take writes (locked, disk full)
    CONNECTION_EVICTED = ("CONNECTION_EVICTED", 503)  # an idle connection closed to admit a new one (metrics only)
    INSUFFICIENT_STORAGE = ("INSUFFICIENT_STORAGE", 507)
    STORAGE_UNAVAILABLE = ("STORAGE_UNAVAILABLE", 503)  # a data directory cannot be written now
    # images (also what a failed job records)
    UNSUPPORTED_FORMAT = ("UNSUPPORTED_FORMAT", 415)
    INVALID_IMAGE = ("INVALID_IMAGE", 422)
    IMAGE_TOO_LARGE = ("IMAGE_TOO_LARGE", 422)   # over a limit, or more memory than a worker has
    IO_ERROR = ("IO_ERROR", 500, True)
    PROCESSING_ERROR = ("PROCESSING_ERROR", 500)  # a bug, not the image's fault: retrying will not help
    # the pool (job rows only)
    TIMEOUT = ("TIMEOUT", 500, True)
    WORKER_CRASHED = ("WORKER_CRASHED", 500, True)
    WORKER_LOST = ("WORKER_LOST", 500, True)

    @classmethod
    def parse(cls, code: str) -> "ErrorCode":
        """The member for ``code``; PROCESSING_ERROR for a name we do not know."""
        try:
            return cls(code)
        except ValueError:
            return cls.PROCESSING_ERROR


# --- upload options ----------------------------------------------------------------------

# name -> (lowest, highest) of the whole-number options of an upload: what the
# API accepts and what its OpenAPI document says it accepts.
OPTION_RANGES: dict[str, tuple[int, int]] = {
    "priority": (-1000, 1000),
    "quality": (1, 100),
    "maxWidth": (1, 65535),
    "maxHeight": (1, 65535),
}

# --- outputs -----------------------------------------------------------------------------

# file extension of each format we read or write
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "avif": "avif", "heic": "heic"}
WRITTEN = ("webp", "jpeg", "png", "gif", "avif")  # formats an output can have (a HEIC "original" becomes JPEG/PNG)
# A job id: a standard UUID (what the original service used and what we
# issue), or the 32 hex digits of earlier versions (still found on disk).
JOB_ID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
_OUT = "|".join(sorted(EXTENSIONS[f] for f in WRITTEN))
OUTPUT_NAME = re.compile(rf"^processed_({JOB_ID_PATTERN})\.({_OUT})$")


def output_filename(job_id: str, fmt: str) -> str:
    """``processed_<jobId>.<ext>``: the only place output names are built."""
    return f"processed_{job_id}.{EXTENSIONS[fmt]}"


@dataclass(frozen=True)
class Outcome:
    """What processing one image produced: sizes, formats, dimensions (as
    displayed), frames and flags. The pipeline returns it, the worker sends
    it, the store keeps its fields as columns, and the API alone turns it
    into the public ``result`` JSON."""

    processing_ms: int
    input_format: str
    input_size: int
    input_width: int
    input_height: int
    output_format: str
    output_size: int
    output_width: int
    output_height: int
    frames_in: int = 1
    frames_out: int = 1
    animated: bool = False
    kept_original: bool = False  # the input re-emitted without metadata (smaller than re-encoding)

    @property
    def resized(self) -> bool:
        return (self.output_width, self.output_height) != (self.input_width, self.input_height)

    @property
    def format_changed(self) -> bool:
        return self.output_format != self.input_format

    @property
    def size_saved(self) -> int:
        return self.input_size - self.output_size

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> "Outcome":
        """Rebuild from a worker's message, checking every field's type (a
        subverted worker must not be able to store anything else).
        Raises ValueError."""
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise ValueError("outcome fields do not match")
        for f in fields(cls):
            value = data[f.name]
            want = {"int": int, "str": str, "bool": bool}[f.type]
            if type(value) is not want:
                raise ValueError(f"outcome field {f.name} is not {f.type}")
        if data["output_format"] not in WRITTEN:
            raise ValueError("unknown output format")
        return cls(**data)
