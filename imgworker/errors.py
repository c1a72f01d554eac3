"""Domain errors. Each carries a stable ``code`` and the HTTP status the API
maps it to in its one error boundary; nothing else in the package knows HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An expected failure with a code a client can act on."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(ServiceError):
    status, code = 404, "NOT_FOUND"


class Conflict(ServiceError):
    status, code = 409, "CONFLICT"


class InvalidParameter(ServiceError):
    status, code = 400, "INVALID_PARAMETER"


class QueueFull(ServiceError):
    status, code = 503, "QUEUE_FULL"


# Image problems: deterministic ones are never retried.
IMAGE_STATUS = {
    "NO_FILE": 400,
    "FILE_TOO_LARGE": 413,
    "UNSUPPORTED_FORMAT": 415,
    "INVALID_IMAGE": 422,
    "IMAGE_TOO_LARGE": 422,
    "IO_ERROR": 500,
}


class ImageError(ServiceError):
    """The pipeline refused or could not process an image.

    ``message`` is for the user (what is wrong with the file, in their
    words); ``detail`` (decoder exception, paths) goes to the log only.
    ``transient`` is true only for failures that may pass on a second try
    (I/O errors); a decode error is never transient, because a second load()
    of a broken stream can "succeed" with a partial image.
    """

    def __init__(self, code: str, message: str, transient: bool = False, detail: str | None = None):
        super().__init__(message, code=code, status=IMAGE_STATUS.get(code, 422))
        self.transient = transient
        self.detail = detail  # for the log only: may name server paths, decoder internals
