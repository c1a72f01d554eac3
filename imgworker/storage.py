"""The data directory: where uploads, outputs and temp files live, and their cleanup.

Layout under DATA_DIR (shared by every node of a cluster)::

    uploads/<jobId>-<pid>.<node>.<ext> accepted uploads (kept until the job's retention ends)
    processed/processed_<jobId>.<ext>  outputs, written atomically by the pipeline
    tmp/                               uploads being received (TMP_DIR, when set, is used
                                       instead: a node's local disk); old ones are orphans

``<pid>.<node>`` names the API process that wrote a file: ``<node>`` is a
short hash of the host name, so a node sweeps only files of its own dead
processes, never another host's upload in flight (a pid means nothing there).

Client file names are never used as paths: every name here is built from a
job id the service generated.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from . import log

LOG = log.get("cleanup")
# A job id: a standard UUID (what the original service used and what we
# issue), or the 32 hex digits of earlier versions (still found on disk).
JOB_ID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
OUTPUT_NAME = re.compile(rf"^processed_({JOB_ID_PATTERN})\.(webp|jpg|png|gif|avif)$")
# group 1 job id, 2 pid, 3 node tag (absent in names written before nodes existed)
UPLOAD_NAME = re.compile(rf"^({JOB_ID_PATTERN})-(\d+)(?:\.([0-9a-f]{{8}}))?\.(jpg|png|webp|gif|avif|heic)$")
TMP_UPLOAD = re.compile(r"^upload-(\d+)(?:\.([0-9a-f]{8}))?-")
NODE_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
ORPHAN_AGE_S = 15 * 60  # older than any upload in flight or job being written


def temp_upload_prefix() -> str:
    """Name prefix of this process's temp uploads (see the module doc)."""
    return f"upload-{os.getpid()}.{NODE_TAG}-"


def _mine(pid: str, tag: str | None) -> bool:
    """A file written by a process of this host that is gone."""
    return (tag is None or tag == NODE_TAG) and not _pid_alive(int(pid))


class Storage:
    def __init__(self, data_dir: Path, tmp_dir: Path | None = None):
        self.root = Path(data_dir)
        self.uploads = self.root / "uploads"
        self.processed = self.root / "processed"
        self.tmp = Path(tmp_dir) if tmp_dir else self.root / "tmp"

    @classmethod
    def for_config(cls, cfg: Any) -> "Storage":
        return cls(cfg.data_dir, cfg.tmp_dir)

    def ensure(self) -> None:
        for d in (self.root, self.uploads, self.processed, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def unwritable(self) -> list[str]:
        """The data directories a file cannot be created in right now
        (read-only filesystem, permissions, no inodes or space, a directory
        gone), each as ``"<dir>/: <reason>"``; empty when all is well. Creates
        and removes one empty file in each (named ``.tmp-writable-*`` so that
        cleanup sweeps one a crash left behind)."""
        problems = []
        for folder in (self.tmp, self.uploads, self.processed):
            try:
                fd, path = tempfile.mkstemp(prefix=".tmp-writable-", dir=folder)
                os.close(fd)
                os.unlink(path)
            except OSError as exc:
                problems.append(f"{folder.name}/: {exc.strerror or type(exc).__name__}")
        return problems

    def upload_path(self, job_id: str, fmt: str) -> Path:
        """``uploads/<jobId>-<pid>.<node>.<ext>``: the pid and host of the API
        process that writes the row let cleanup tell at once an upload whose
        row never committed (its process died) from one still being committed."""
        return self.uploads / f"{job_id}-{os.getpid()}.{NODE_TAG}.{'jpg' if fmt == 'jpeg' else fmt}"

    def move_in(self, src: Path, dst: Path) -> None:
        """Move a received upload into uploads/ atomically: a rename, or when
        TMP_DIR is on another file system (a node's local disk, DATA_DIR a
        shared mount) a copy to a hidden name beside ``dst`` first, synced,
        then the rename. Readers never see a partial file."""
        try:
            os.replace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        part = dst.with_name(f".tmp-{dst.name}")
        try:
            with open(src, "rb") as fin, open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1024 * 1024)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(part, dst)
        except BaseException:
            _unlink(part)
            raise
        _unlink(src)

    def output_file(self, filename: str) -> Path | None:
        """The processed file named ``filename`` if it is one the service
        wrote: the name must match processed_<id>.<ext> exactly (no
        separators, dots, NUL or encodings), and the file must be a regular
        file, not a symlink. None otherwise."""
        if not OUTPUT_NAME.fullmatch(filename):
            return None
        path = self.processed / filename
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def discard_upload(self, path: str | Path | None) -> None:
        """Remove a job's upload once it can no longer be needed (the job
        completed or was cancelled: only a failed job can be retried). Only
        files directly in uploads/ are touched."""
        if path and Path(path).parent == self.uploads:
            _unlink(path)

    def cleanup(self, queue: Any, retention_ms: int, now_ms: int | None = None) -> dict[str, int]:
        """Remove finished jobs older than the retention with their files,
        and orphan files (temp files, uploads and outputs without a job row)
        older than ORPHAN_AGE_S. Returns counts."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        removed_jobs = removed_files = 0
        while True:
            expired = queue.expired(older_than=now_ms - retention_ms)
            if not expired:
                break
            for job in expired:
                for p in (job["input_path"], job["output_path"]):
                    removed_files += _unlink(p)
            removed_jobs += queue.delete([j["id"] for j in expired])
        cutoff = now_ms / 1000 - ORPHAN_AGE_S
        removed_files += self.sweep_dead(queue)
        for entry in _old_entries(self.tmp, cutoff):
            removed_files += _unlink(entry)
        for folder, pattern in ((self.uploads, UPLOAD_NAME), (self.processed, OUTPUT_NAME)):
            candidates: dict[str, list[Path]] = {}
            for entry in _old_entries(folder, cutoff):
                match = pattern.match(entry.name)
                if match:
                    candidates.setdefault(match.group(1), []).append(entry)
                elif entry.name.startswith(".tmp-"):
                    removed_files += _unlink(entry)
            if candidates:
                known = queue.known_ids(candidates)
                for job_id, paths in candidates.items():
                    if job_id not in known:
                        for p in paths:
                            removed_files += _unlink(p)
        if removed_jobs or removed_files:
            LOG.info("Cleanup removed %d expired jobs and %d files", removed_jobs, removed_files)
        return {"jobs": removed_jobs, "files": removed_files}


    def sweep_dead(self, queue: Any) -> int:
        """Delete, whatever their age, files left by processes that died
        mid-upload: temp uploads (``upload-<pid>.<node>-*``) and uploads
        without a job row (``<jobId>-<pid>.<node>.<ext>``) whose writing
        process is gone. Only this host's files: on a shared DATA_DIR another
        node's pid cannot be checked from here (its old files go by age)."""
        count = 0
        for entry in _old_entries(self.tmp, float("inf")):
            match = TMP_UPLOAD.match(entry.name)
            if match and _mine(match.group(1), match.group(2)):
                count += _unlink(entry)
        candidates = {}
        for entry in _old_entries(self.uploads, float("inf")):
            match = UPLOAD_NAME.match(entry.name)
            if match and _mine(match.group(2), match.group(3)):
                candidates[match.group(1)] = entry
        if candidates:
            known = queue.known_ids(candidates)
            count += sum(_unlink(p) for job_id, p in candidates.items() if job_id not in known)
        return count

    def remove_partial_output(self, job_id: str) -> int:
        """Delete what a killed worker was writing for ``job_id``."""
        return sum(_unlink(p) for p in self.processed.glob(f".tmp-processed_{job_id}.*"))

    def remove_partial_outputs(self) -> int:
        """Delete half-written outputs (``.tmp-*`` in processed/). Only safe
        when no supervisor is running jobs on this storage."""
        count = 0
        for entry in _old_entries(self.processed, float("inf")):
            if entry.name.startswith(".tmp-"):
                count += _unlink(entry)
        return count


def fsync_dir(path: Path) -> None:
    """Make renames into ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _old_entries(folder: Path, cutoff: float) -> list[Path]:
    out = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        out.append(Path(entry.path))
                except OSError:
                    pass
    except OSError:
        pass
    return out


def _unlink(path: str | Path | None) -> int:
    if not path:
        return 0
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        LOG.warning("Could not remove %s: %s", path, exc)
        return 0
