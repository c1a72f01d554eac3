"""Presentation at the edge: the public JSON of the original service, built
from typed values. The API answers with these; the client's local fallback
shows the same shape. Nothing below the API stores or parses this JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .clock import iso
from .model import JobStatus, Outcome, output_filename

if TYPE_CHECKING:  # annotations only: the client's `process --local` never loads the stores
    from .store import Job, MinuteActivity, QueueStats

IMAGES_ROUTE = "/api/images/"


def image_url(filename: str) -> str:
    return IMAGES_ROUTE + filename


def result_view(job_id: str, original_name: str, outcome: Outcome, url: bool = True) -> dict[str, Any]:
    """``result`` of ``GET /api/job/:id``, key for key as in the original
    README (plus ``keptOriginalEncoding``, ``animated``, ``framesIn`` and
    ``framesOut``). ``url=False``: no server serves the file (local
    processing), so ``url`` is None."""
    filename = output_filename(job_id, outcome.output_format)
    o = outcome
    ratio = (o.size_saved / o.input_size * 100) if o.input_size else 0
    return {
        "success": True,
        "processingTime": o.processing_ms,
        "originalFile": {
            "name": original_name,
            "size": o.input_size,
            "format": o.input_format,
            "dimensions": {"width": o.input_width, "height": o.input_height},
        },
        "processedFile": {
            "filename": filename,
            "size": o.output_size,
            "format": o.output_format,
            "dimensions": {"width": o.output_width, "height": o.output_height},
            "url": image_url(filename) if url else None,
        },
        "optimization": {
            "wasResized": o.resized,
            "formatChanged": o.format_changed,
            "compressionRatio": f"{ratio:.1f}%",
            "sizeSaved": o.size_saved,
            "keptOriginalEncoding": o.kept_original,
        },
        "animated": o.animated,
        "framesIn": o.frames_in,
        "framesOut": o.frames_out,
    }


def job_view(job: Job, queue_position: int | None = None) -> dict[str, Any]:
    """``GET /api/job/:id``. ``queue_position``: of a waiting job."""
    view: dict[str, Any] = {
        "jobId": job.id, "status": job.status, "priority": job.priority,
        "attempts": job.attempts, "maxAttempts": job.max_attempts, "filename": job.original_name,
        "createdAt": iso(job.created_at), "startedAt": iso(job.started_at),
        # a cancelled job never completed: when it was cancelled is cancelledAt
        "completedAt": iso(job.completed_at) if job.status != JobStatus.CANCELLED else None,
    }
    if job.batch_id:
        view["batchId"] = job.batch_id
    if job.status == JobStatus.CANCELLED:
        view["cancelledAt"] = iso(job.completed_at)
    if job.status == JobStatus.QUEUED:
        view["queuePosition"] = queue_position
    if job.status == JobStatus.RETRYING:
        view["nextRetryAt"] = iso(job.run_at)
        view["queuePosition"] = queue_position
    if job.error and job.status in (JobStatus.FAILED, JobStatus.RETRYING):
        view["error"] = job.error
        view["errorCode"] = job.error_code
    if job.outcome is not None:
        view["result"] = result_view(job.id, job.original_name, job.outcome)
    if job.options.get("formatRequested") == "auto":  # the format chosen from the client's Accept header
        view["format"] = {"requested": "auto", "chosen": job.options.get("format"), "accept": job.options.get("accept", "")}
    return view


def stats_view(stats: QueueStats) -> dict[str, Any]:
    """The original service's queue statistics (``GET /api/stats`` top level)."""
    return {
        "totalJobs": stats.total,
        "completedJobs": stats.completed,
        "failedJobs": stats.failed,
        "currentQueueSize": stats.waiting,
        "currentProcessingCount": stats.processing,
        "averageProcessingTime": stats.average_processing_ms,
        "completedInLast24h": stats.completed_24h,
        "failedInLast24h": stats.failed_24h,
        "byStatus": dict(stats.by_status),
    }


def activity_view(m: MinuteActivity) -> dict[str, Any]:
    """One minute of the dashboard's activity chart."""
    return {"minute": m.minute, "completed": m.completed, "failed": m.failed,
            "avgMs": round(m.avg_ms) if m.avg_ms is not None else None}


def failure_view(job: Job) -> dict[str, Any]:
    """A failed job in the dashboard's list."""
    return {"jobId": job.id, "filename": job.original_name, "code": job.error_code, "error": job.error,
            "failedAt": job.completed_at, "attempts": job.attempts}
