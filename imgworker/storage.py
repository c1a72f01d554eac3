"""The data directory: where uploads, outputs and temp files live. Files
only: which of them are still wanted is for housekeeping.py to decide with
the job store.

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
from pathlib import Path
from typing import Any

from . import log
from .model import EXTENSIONS, JOB_ID_PATTERN, OUTPUT_NAME

LOG = log.get("storage")
_UPLOAD_EXT = "|".join(sorted(set(EXTENSIONS.values())))
# group 1 job id, 2 pid, 3 node tag (absent in names written before nodes existed)
UPLOAD_NAME = re.compile(rf"^({JOB_ID_PATTERN})-(\d+)(?:\.([0-9a-f]{{8}}))?\.({_UPLOAD_EXT})$")
TMP_UPLOAD = re.compile(r"^upload-(\d+)(?:\.([0-9a-f]{8}))?-")
NODE_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


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
        return self.uploads / f"{job_id}-{os.getpid()}.{NODE_TAG}.{EXTENSIONS[fmt]}"

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

    def remove_job_files(self, input_path: str | None, output_path: str | None) -> int:
        """Delete an expired job's upload and output; returns files removed."""
        return _unlink(input_path) + _unlink(output_path)

    def remove_old_temp_files(self, cutoff_s: float) -> int:
        """Delete entries of the temp folder last modified before ``cutoff_s`` (epoch seconds)."""
        return sum(_unlink(entry) for entry in _old_entries(self.tmp, cutoff_s))

    def remove_old_partials(self, cutoff_s: float) -> int:
        """Delete half-written files (``.tmp-*``) in uploads/ and processed/
        last modified before ``cutoff_s``."""
        return sum(_unlink(entry) for folder in (self.uploads, self.processed)
                   for entry in _old_entries(folder, cutoff_s) if entry.name.startswith(".tmp-"))

    def old_job_files(self, cutoff_s: float) -> dict[str, list[Path]]:
        """Uploads and outputs last modified before ``cutoff_s``, by the job id
        in their name (the caller keeps those whose job has a row)."""
        found: dict[str, list[Path]] = {}
        for folder, pattern in ((self.uploads, UPLOAD_NAME), (self.processed, OUTPUT_NAME)):
            for entry in _old_entries(folder, cutoff_s):
                match = pattern.match(entry.name)
                if match:
                    found.setdefault(match.group(1), []).append(entry)
        return found

    def remove_dead_temp_uploads(self) -> int:
        """Delete, whatever their age, temp uploads (``upload-<pid>.<node>-*``)
        of this host's processes that are gone (another node's pid cannot be
        checked from here: its old files go by age)."""
        count = 0
        for entry in _old_entries(self.tmp, float("inf")):
            match = TMP_UPLOAD.match(entry.name)
            if match and _mine(match.group(1), match.group(2)):
                count += _unlink(entry)
        return count

    def uploads_of_dead_processes(self) -> dict[str, list[Path]]:
        """Uploads (``<jobId>-<pid>.<node>.<ext>``) whose writing process on
        this host is gone, by job id: the caller deletes those without a row
        (their transaction never committed)."""
        found: dict[str, list[Path]] = {}
        for entry in _old_entries(self.uploads, float("inf")):
            match = UPLOAD_NAME.match(entry.name)
            if match and _mine(match.group(2), match.group(3)):
                found.setdefault(match.group(1), []).append(entry)
        return found

    @staticmethod
    def remove(paths: list[Path]) -> int:
        return sum(_unlink(p) for p in paths)

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
