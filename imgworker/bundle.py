"""A zip of a batch's outputs, streamed as it is written.

The images are already compressed, so entries are stored (no deflate): the
cost is one read of each file, and memory stays at one chunk whatever the
batch size. Entry names come from the client's display names (already
reduced to a safe last path component by the API), with the output's
extension and ``-1``, ``-2``... on duplicates, so nothing is overwritten when
the zip is unpacked.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

CHUNK = 256 * 1024


class _Sink(io.RawIOBase):
    """A write-only, non-seekable stream that hands back what was written
    (zipfile then writes data descriptors instead of seeking back)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(b))
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def entry_names(pairs: Iterable[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """(display name, output path) -> (unique entry name, path): the
    original's stem with the output's extension."""
    taken: set[str] = set()
    out = []
    for display, path in pairs:
        stem = Path(display).stem.strip(". ") or "image"
        name, n = f"{stem}{path.suffix}", 1
        while name.lower() in taken:
            name = f"{stem}-{n}{path.suffix}"
            n += 1
        taken.add(name.lower())
        out.append((name, path))
    return out


def stream_zip(entries: list[tuple[str, Path]]) -> Iterator[bytes]:
    """Yield the zip of ``entries`` (entry name, file) chunk by chunk. A file
    that vanished meanwhile (cleanup) is left out."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        for name, path in entries:
            try:
                src = open(path, "rb")
            except FileNotFoundError:
                continue
            with src, zf.open(zipfile.ZipInfo(name, date_time=_stamp(path)), "w") as dest:
                while block := src.read(CHUNK):
                    dest.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def _stamp(path: Path) -> tuple[int, int, int, int, int, int]:
    import time

    try:
        t = time.localtime(path.stat().st_mtime)
    except OSError:
        t = time.localtime()
    return (max(1980, t.tm_year), t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
