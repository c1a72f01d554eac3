"""The OpenAPI 3 document served at ``GET /api/openapi.json``.

Kept beside the routes it describes; tests/test_api.py checks that every
route of the app is documented and every documented path exists.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from . import config as config_mod
from .model import JOB_ID_PATTERN, OPTION_RANGES


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema:
        body["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return body


def _upload(field: str, many: bool, cfg: config_mod.Config) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    props: dict[str, Any] = {
        field: {"type": "array", "items": file_schema, "maxItems": cfg.batch_max_files} if many else file_schema,
        "format": {"type": "string", "enum": list(config_mod.OUTPUT_FORMATS)},
        **{name: {"type": "integer", "minimum": lo, "maximum": hi} for name, (lo, hi) in OPTION_RANGES.items()},
    }
    props["priority"]["description"] = (f"higher runs first; above {cfg.max_client_priority} (MAX_CLIENT_PRIORITY) "
                                        "it is lowered to that")
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": props}}}}


UPLOAD_ERRORS = {
    "400": _error("NO_FILE or INVALID_PARAMETER (names the field)"),
    "408": _error("REQUEST_TIMEOUT: headers later than HEADER_TIMEOUT_MS or a body slower than BODY_MIN_BYTES_PER_S"),
    "413": _error("FILE_TOO_LARGE: refused from Content-Length before the body is read (chunked: once over)"),
    "415": _error("UNSUPPORTED_FORMAT: detected from the bytes"),
    "422": _error("INVALID_IMAGE or IMAGE_TOO_LARGE"),
    "429": _error("RATE_LIMITED, with Retry-After and RateLimit-* headers (a batch of N files counts N)"),
    "503": _error("QUEUE_FULL, TOO_MANY_CONNECTIONS or STORAGE_UNAVAILABLE (the upload cannot be written), "
                  "with Retry-After"),
    "507": _error("INSUFFICIENT_STORAGE: less than MIN_FREE_DISK_MB free; with Retry-After"),
}
JOB_PARAM = [{"name": "jobId", "in": "path", "required": True, "schema": {"type": "string", "pattern": f"^({JOB_ID_PATTERN})$"}}]


def document(cfg: config_mod.Config) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "imgworker", "version": __version__,
                 "description": "Durable image-processing jobs: upload, poll, download."},
        "paths": {
            "/api/process/single": {"post": {"summary": "Queue one image", "requestBody": _upload("image", False, cfg),
                                             "responses": {"202": _ok("Queued", "Accepted"), **UPLOAD_ERRORS}}},
            "/api/process/batch": {"post": {"summary": "Queue several images", "requestBody": _upload("images", True, cfg),
                                            "responses": {"202": _ok("Queued; bad files listed in rejected", "BatchAccepted"),
                                                          **UPLOAD_ERRORS}}},
            "/api/job/{jobId}": {
                "parameters": JOB_PARAM,
                "get": {"summary": "Job status and result", "responses": {"200": _ok("The job", "Job"), "404": _error("NOT_FOUND")}},
                "delete": {"summary": "Cancel a queued or retrying job",
                           "responses": {"200": _ok("Cancelled"), "404": _error("NOT_FOUND"), "409": _error("CONFLICT")}},
            },
            "/api/job/{jobId}/retry": {"parameters": JOB_PARAM, "post": {
                "summary": "Send a failed job back to the queue",
                "responses": {"202": _ok("Queued again"), "404": _error("NOT_FOUND"), "409": _error("CONFLICT"),
                              "429": _error("RATE_LIMITED"), "503": _error("QUEUE_FULL")}}},
            "/api/batch/{batchId}": {"parameters": [dict(JOB_PARAM[0], name="batchId")], "get": {
                "summary": "Batch progress", "responses": {"200": _ok("The batch"), "404": _error("NOT_FOUND")}}},
            "/api/batch/{batchId}/download": {"parameters": [dict(JOB_PARAM[0], name="batchId")], "get": {
                "summary": "A zip of the batch's processed images (streamed; names from the originals)",
                "responses": {"200": {"description": "Zip", "content": {"application/zip": {
                    "schema": {"type": "string", "format": "binary"}}}},
                              "404": _error("NOT_FOUND"), "409": _error("CONFLICT")}}},
            "/api/dashboard": {"get": {"summary": "What the operator dashboard shows: statistics, queue by "
                                                  "priority, pool, memory marks, the last hour per minute, recent failures",
                                       "responses": {"200": _ok("Dashboard data")}}},
            "/dashboard": {"get": {"summary": "The operator dashboard", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/api/images/{filename}": {"parameters": [{"name": "filename", "in": "path", "required": True,
                                                       "schema": {"type": "string"}}],
                                       "get": {"summary": "A processed image (ETag, immutable caching)",
                                               "responses": {"200": {"description": "The image",
                                                                     "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                                                             "304": {"description": "Not modified"},
                                                             "404": _error("NOT_FOUND")}}},
            "/api/stats": {"get": {"summary": "Queue and pool statistics", "responses": {"200": _ok("Statistics")}}},
            "/api/health": {"get": {"summary": "Health check", "responses": {
                "200": _ok("Database answers and a supervisor reported recently"),
                "503": _ok("Database unreachable, no supervisor, or a data directory cannot be written "
                           "(status degraded; reason and storage say which and why)")}}},
            "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": _ok("OpenAPI 3")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"summary": "The web page", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["success", "error", "code"], "properties": {
                "success": {"type": "boolean", "enum": [False]}, "error": {"type": "string"}, "code": {"type": "string"}}},
            "Accepted": {"type": "object", "required": ["success", "jobId", "estimatedTime", "message", "statusUrl"],
                         "properties": {"success": {"type": "boolean"}, "jobId": {"type": "string"},
                                        "estimatedTime": {"type": "integer"}, "queuePosition": {"type": "integer"},
                                        "message": {"type": "string"}, "statusUrl": {"type": "string"}}},
            "BatchAccepted": {"type": "object", "required": ["success", "batchId", "jobs", "rejected", "message"],
                              "properties": {"success": {"type": "boolean"}, "batchId": {"type": "string"},
                                             "jobs": {"type": "array", "items": {"type": "object"}},
                                             "rejected": {"type": "array", "items": {"type": "object"}},
                                             "message": {"type": "string"}}},
            "Job": {"type": "object", "required": ["jobId", "status", "priority", "attempts", "createdAt"], "properties": {
                "jobId": {"type": "string"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "retrying", "cancelled"]},
                "priority": {"type": "integer"}, "attempts": {"type": "integer"},
                "createdAt": {"type": "string"}, "startedAt": {"type": "string", "nullable": True},
                "completedAt": {"type": "string", "nullable": True}, "queuePosition": {"type": "integer"},
                "nextRetryAt": {"type": "string"}, "error": {"type": "string"}, "errorCode": {"type": "string"},
                "result": {"type": "object"}}},
        }},
    }
