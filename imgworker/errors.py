"""Domain errors. Each carries a stable ``code`` (an :class:`ErrorCode`,
which knows its HTTP status) that the API maps in its one error boundary;
nothing else in the package knows HTTP.
"""

from __future__ import annotations

from .model import ErrorCode


class ServiceError(Exception):
    """An expected failure with a code a client can act on."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def status(self) -> int:
        return self.code.http_status


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND


class Conflict(ServiceError):
    code = ErrorCode.CONFLICT


class InvalidParameter(ServiceError):
    code = ErrorCode.INVALID_PARAMETER


class QueueFull(ServiceError):
    code = ErrorCode.QUEUE_FULL


class ImageError(ServiceError):
    """The pipeline refused or could not process an image.

    ``message`` is for the user (what is wrong with the file, in their
    words); ``detail`` (decoder exception, paths) goes to the log only.
    Whether a job failing with it is retried is the code's ``transient``
    flag (only I/O errors): a decode error is never retried, because a
    second load() of a broken stream can "succeed" with a partial image.
    """

    def __init__(self, code: ErrorCode | str, message: str, transient: bool | None = None, detail: str | None = None):
        super().__init__(message, code)
        self.transient = self.code.transient if transient is None else transient
        self.detail = detail  # for the log only: may name server paths, decoder internals


class OutOfMemory(ImageError):
    """IMAGE_TOO_LARGE because an allocation failed under the worker's
    address-space cap, not because a limit check refused the image: a
    process holding less memory may still fit it (worker.py retries it
    once in a fresh one)."""

    def __init__(self, message: str):
        super().__init__("IMAGE_TOO_LARGE", message)


class StoreError(RuntimeError):
    """The store cannot be used: missing, too old, unreachable, bad migration
    (defined here, not in store/, so that a command that never opens a
    database can catch it without importing the stores)."""
