"""Structural probing: what an image file declares, read from its structure
alone, bounded in time and memory, before any decoder sees it.

Contract:
- :func:`inspect` walks a JPEG, PNG, GIF or WebP file's segments, chunks or
  blocks with its own small parser (never Pillow: Pillow's open decompresses
  PNG text chunks and counts every GIF frame) and checks every declared size
  against the limits: the canvas, every frame (a GIF frame may declare a size
  larger than the screen, and decoders grow the canvas to fit it), frames x
  canvas, and the JPEG scan count (every progressive scan costs a pass over
  the whole image; a few hundred KB of empty scans take a decoder minutes).
- It reads through a fixed window (a few hundred KB at most in memory, never
  the whole file) and never decompresses anything. Frames are counted only up
  to ``max_frames + 1``: past the limit only the first frame is decoded, so the
  rest need not be walked (a 48 MB GIF of 2 million 1x1 frames costs no more
  than one of 1,001). The number of segments or chunks walked is bounded too.
- Lying length fields, truncated structures, duplicate frame headers and
  unknown GIF blocks are INVALID_IMAGE; limits exceeded are IMAGE_TOO_LARGE.
  Both are deterministic (never transient). Reading errors are IO_ERROR
  (transient).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import isobmff
from .errors import ImageError

if TYPE_CHECKING:  # imaging imports this module; the type is only for hints
    from .imaging import Limits

# Signatures of formats we may be sent, to tell "not an image we accept"
# (415) from "one of ours, but broken" (422) without trusting Pillow's guess.
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"8BPS", "psd"), (b"%PDF", "pdf"),
    (b"%!PS", "eps"), (b"\xc5\xd0\xd3\xc6", "eps"), (b"PK\x03\x04", "zip"), (b"icns", "icns"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"), (b"\xff\x4f\xff\x51", "jpeg2000"), (b"\x01\xda", "sgi"),
    (b"\x00\x00\x01\x00", "ico"), (b"<?xml", "svg"), (b"<svg", "svg"), (b"<?php", "text"),
)

WINDOW = 256 * 1024  # bytes read at a time; the most a probe holds
MAX_SEGMENTS = 100_000  # segments/chunks/blocks walked; real files have hundreds


def sniff(head: bytes) -> str | None:
    """Format name from the first bytes (ours or a known foreign one), or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    family = isobmff.sniff(head)
    if family is not None:
        return family  # avif, heic, heif (codec decided by the items) or mp4
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


@dataclass(frozen=True)
class Header:
    """What the structure declares. ``width``/``height`` are the canvas a
    decoder allocates (stored orientation, GIF screen grown to its frames);
    ``frames`` is counted up to ``max_frames + 1``; ``alpha``: the picture
    declares transparency."""

    format: str
    width: int
    height: int
    frames: int = 1
    scans: int = 0
    alpha: bool = False
    lossless_jpeg: bool = False  # a predictive (not DCT) JPEG frame: libjpeg cannot decode it scaled


class _Truncated(Exception):
    pass


class _Reader:
    """Sequential reads through a fixed window over a file of known size."""

    def __init__(self, fh: BinaryIO, size: int):
        self.fh, self.size = fh, size
        self.pos = 0
        self._buf, self._base = b"", 0

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        start = self.pos - self._base
        if start < 0 or start + n > len(self._buf):
            self.fh.seek(self.pos)
            self._buf, self._base, start = self.fh.read(max(n, WINDOW)), self.pos, 0
            if len(self._buf) < n:
                raise _Truncated
        self.pos += n
        return self._buf[start:start + n]

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= self.size

    def find(self, pattern: re.Pattern[bytes]) -> int:
        """Offset of the next match at or after pos (pos is left there);
        raises _Truncated when there is none. Matches must be 2 bytes long."""
        while self.pos < self.size:
            start = self.pos - self._base
            if start < 0 or start + 2 > len(self._buf):
                self.fh.seek(self.pos)
                self._buf, self._base, start = self.fh.read(WINDOW), self.pos, 0
                if len(self._buf) < 2:
                    break
            match = pattern.search(self._buf, start)
            if match:
                self.pos = self._base + match.start()
                return self.pos
            self.pos = self._base + len(self._buf) - 1  # a marker may straddle the window
            if self.pos + 1 >= self.size:
                break
        raise _Truncated


def inspect(path: Path | str, limits: "Limits") -> Header:
    """Identify ``path`` by its bytes against the allow-list and check every
    declared size against ``limits``. Raises :class:`ImageError`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            if not head:
                raise ImageError("INVALID_IMAGE", "The file is empty")
            kind = sniff(head)
            if kind in ("avif", "heic", "heif") and ("avif" in limits.formats or "heic" in limits.formats):
                fh.seek(0)
                return _heif(fh, limits)
            if kind not in limits.formats:
                what = kind.upper() if kind else "not an image format we recognise"
                raise ImageError(
                    "UNSUPPORTED_FORMAT",
                    f"Unsupported file type ({what}); accepted: {', '.join(f.upper() for f in limits.formats)}",
                )
            fh.seek(0, 2)
            reader = _Reader(fh, fh.tell())
            try:
                return _WALKERS[kind](reader, limits)
            except (_Truncated, struct.error, IndexError):
                raise ImageError("INVALID_IMAGE", f"The {kind.upper()} file is truncated or a length in it is wrong",
                                 detail=f"probe: stopped at byte {reader.pos:,} of {reader.size:,}") from None
            except ImageError as exc:
                exc.detail = exc.detail or f"probe: stopped at byte {reader.pos:,} of {reader.size:,}"
                raise
    except OSError as exc:
        raise ImageError("IO_ERROR", "The upload could not be read on the server", transient=True,
                         detail=f"{type(exc).__name__}: {exc}") from None


def _heif(fh: BinaryIO, limits: "Limits") -> Header:
    """The HEIF family (AVIF, HEIC): its boxes are checked by isobmff.py; the
    format comes from the primary item's codec."""
    try:
        header = isobmff.inspect(fh, limits.max_input_pixels, limits.max_animation_pixels)
    except isobmff.HeaderError as exc:
        raise ImageError(exc.code, exc.message) from None
    if header.format not in limits.formats:
        raise ImageError("UNSUPPORTED_FORMAT", f"Unsupported file type ({header.format.upper()}); accepted: "
                                               f"{', '.join(f.upper() for f in limits.formats)}")
    width, height = header.width, header.height
    if header.rotation in (90, 270):  # the decoders apply irot: the picture is shown turned
        width, height = height, width
    return Header(header.format, width, height, header.frames, alpha=header.alpha)


def check_pixels(width: int, height: int, limits: "Limits", what: str = "The image") -> None:
    """Refuse an empty or over-limit size."""
    if width <= 0 or height <= 0:
        raise ImageError("INVALID_IMAGE", f"{what} has an empty size ({width}x{height})")
    if width * height > limits.max_input_pixels:
        raise ImageError(
            "IMAGE_TOO_LARGE",
            f"{what} is {width}x{height} ({width * height:,} pixels); the limit is {limits.max_input_pixels:,} pixels",
        )


def check_animation(fmt: str, frames: int, width: int, height: int, limits: "Limits") -> None:
    """The frames x canvas budget bounds the work; an animation within it but
    longer than MAX_FRAMES is kept as a still (only frame 1 is decoded)."""
    if frames > 1 and frames * width * height > limits.max_animation_pixels:
        more = "more than " if frames > limits.max_frames else ""
        raise ImageError(
            "IMAGE_TOO_LARGE",
            f"The animation is {more}{min(frames, limits.max_frames)} frames of {width}x{height}; the limit is "
            f"{limits.max_animation_pixels:,} pixels in all frames",
        )


def _invalid(fmt: str, why: str) -> ImageError:
    return ImageError("INVALID_IMAGE", f"The {fmt} file is corrupt: {why}")


# --- JPEG ------------------------------------------------------------------------------------
# A marker inside entropy-coded data: FF followed by anything but a stuffed
# 00, a restart marker or another FF (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_LOSSLESS_SOF = frozenset((0xC3, 0xC7, 0xCB, 0xCF))  # predictive coding, no DCT


def _jpeg(r: _Reader, limits: "Limits") -> Header:
    """Walk every segment and scan up to EOI, as libjpeg reads them: count the
    scans (SOS) and refuse past ``limits.max_jpeg_scans``; one frame header."""
    r.skip(2)  # SOI
    size: tuple[int, int] | None = None
    scans = segments = 0
    lossless = False
    while True:
        segments += 1
        if segments > MAX_SEGMENTS:
            raise _invalid("JPEG", f"more than {MAX_SEGMENTS:,} segments")
        if r.read(1) != b"\xff":
            # entropy-coded data after a scan header, or stray bytes, which
            # libjpeg skips to the next marker
            r.pos -= 1
            r.find(_JPEG_MARKER)
            r.skip(1)
        marker = r.read(1)[0]
        while marker == 0xFF:  # fill bytes
            marker = r.read(1)[0]
        if marker == 0xD9:  # EOI: anything after it (MPO pictures, payloads) is not decoded
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):  # RSTn, stuffing, TEM: no length
            continue
        if marker == 0xD8:
            raise _invalid("JPEG", "a second start-of-image marker")
        length = struct.unpack(">H", r.read(2))[0]
        if length < 2:
            raise _invalid("JPEG", f"segment length {length}")
        if marker in _SOF:
            if size is not None:
                raise _invalid("JPEG", "more than one frame header")
            body = r.read(length - 2)
            if len(body) < 6:
                raise _invalid("JPEG", "short frame header")
            height, width, ncomp = struct.unpack(">HHB", body[1:6])
            if ncomp not in (1, 2, 3, 4) or len(body) != 6 + 3 * ncomp:
                raise _invalid("JPEG", f"frame header with {ncomp} components")
            if height == 0:
                raise _invalid("JPEG", "height defined later by a DNL marker, which decoders refuse")
            check_pixels(width, height, limits)
            size = (width, height)
            lossless = marker in _LOSSLESS_SOF
        elif marker == 0xDA:  # SOS: a header, then entropy-coded data up to the next marker
            if size is None:
                raise _invalid("JPEG", "a scan before the frame header")
            body = r.read(length - 2)
            if not body or body[0] not in (1, 2, 3, 4) or len(body) != 4 + 2 * body[0]:
                raise _invalid("JPEG", "bad scan header")
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise ImageError(
                    "IMAGE_TOO_LARGE",
                    f"The JPEG has more than {limits.max_jpeg_scans} scans; each costs a pass over the whole "
                    "image (encoders write 10 to 20)",
                )
        else:
            r.skip(length - 2)
    if size is None or scans == 0:
        raise _invalid("JPEG", "no image data")
    return Header("jpeg", size[0], size[1], 1, scans, lossless_jpeg=lossless)


# --- PNG -------------------------------------------------------------------------------------
def _png(r: _Reader, limits: "Limits") -> Header:
    """Walk the chunks (never reading text chunks, never inflating anything):
    IHDR, acTL and every fcTL of the frames that will be decoded."""
    r.skip(8)
    length, kind = struct.unpack(">I4s", r.read(8))
    if kind != b"IHDR" or length != 13:
        raise _invalid("PNG", "the first chunk is not a header")
    width, height, depth, colour = struct.unpack(">IIBB", r.read(10))
    r.skip(3 + 4)
    if (colour, depth) not in _PNG_DEPTHS:
        raise _invalid("PNG", f"colour type {colour} with bit depth {depth}")
    check_pixels(width, height, limits)
    alpha = colour in (4, 6)
    declared = 0  # acTL frame count, 0 for a still
    controls = 0  # fcTL chunks seen
    default_image = False  # the IDAT picture is not part of the animation
    seen_idat = False
    for _ in range(MAX_SEGMENTS):
        if r.at_end():
            break
        length, kind = struct.unpack(">I4s", r.read(8))
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise _invalid("PNG", f"a chunk of length {length} or with a type that is not four letters")
        if kind == b"IEND":
            break
        if kind == b"acTL" and not seen_idat and length >= 8:
            frames = struct.unpack(">I", r.read(4))[0]
            r.skip(length - 4)
            # as Pillow: a second acTL cancels the first, a zero or absurd one is ignored
            declared = 0 if declared else (frames if 0 < frames <= 0x80000000 else 0)
        elif kind == b"fcTL" and declared > 0:
            if length < 26:
                raise _invalid("PNG", "short frame control chunk")
            fw, fh, fx, fy = struct.unpack(">IIII", r.read(20)[4:20])
            r.skip(length - 20)
            controls += 1
            if fw == 0 or fh == 0 or fx + fw > width or fy + fh > height:
                raise _invalid("PNG", f"frame {controls} is {fw}x{fh} at {fx},{fy} on a {width}x{height} canvas")
        else:
            if kind == b"tRNS" and not seen_idat:
                alpha = True
            if kind == b"IDAT" and not seen_idat:
                seen_idat = True
                default_image = declared > 0 and controls == 0
            r.skip(length)
        r.skip(4)  # CRC
        if seen_idat and (controls >= declared or declared + default_image > limits.max_frames):
            # a still, every frame to decode checked, or only the first one decoded; but the
            # rest of the image data is walked too, so its chunks count against MAX_SEGMENTS
            # (Pillow walks each one in Python, ~1 us a chunk: a 48 MB file of empty image data
            # chunks cost a worker 5 s of CPU). What follows it is the decoder's to read.
            if kind != b"IDAT" or _next_chunk(r) != b"IDAT":
                break
    else:
        raise _invalid("PNG", f"more than {MAX_SEGMENTS:,} chunks")
    if not seen_idat:
        raise _invalid("PNG", "no image data")
    frames = declared + default_image if declared > 0 else 1
    if declared > 0 and frames <= limits.max_frames and controls < declared:
        raise _invalid("PNG", f"the animation declares {declared} frames but has {controls}")
    frames = min(frames, limits.max_frames + 1)
    check_animation("png", frames, width, height, limits)
    return Header("png", width, height, frames, alpha=alpha)


def _next_chunk(r: _Reader) -> bytes:
    """The type of the chunk at pos (b"" at the end of the file), pos unmoved."""
    if r.pos + 8 > r.size:
        return b""
    kind = r.read(8)[4:]
    r.pos -= 8
    return kind


_PNG_DEPTHS = {(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
               (4, 8), (4, 16), (6, 8), (6, 16)}


# --- GIF -------------------------------------------------------------------------------------
MAX_GIF_SUB_BLOCKS = 1_000_000  # a 50 MB GIF in the usual 255-byte sub-blocks has 200,000


class _SubBlocks:
    """Walks GIF data sub-blocks within one budget for the whole file (a
    file of 1-byte sub-blocks would otherwise cost a Python step per 2 bytes)."""

    def __init__(self) -> None:
        self.left = MAX_GIF_SUB_BLOCKS

    def skip(self, r: _Reader) -> None:
        while True:
            n = r.read(1)[0]
            if n == 0:
                return
            self.left -= 1
            if self.left < 0:
                raise _invalid("GIF", f"more than {MAX_GIF_SUB_BLOCKS:,} data sub-blocks")
            r.skip(n)


def _gif(r: _Reader, limits: "Limits") -> Header:
    """Walk the blocks up to the trailer (or max_frames + 1 frames); every
    image descriptor's extent grows the canvas as decoders do, and the grown
    canvas is what is checked."""
    r.skip(6)
    width, height, flags = struct.unpack("<HHB", r.read(5))
    r.skip(2)
    if flags & 0x80:
        r.skip(3 << ((flags & 7) + 1))
    canvas_w, canvas_h = width, height
    frames = 0
    alpha = False
    sub_blocks = _SubBlocks()
    for _ in range(MAX_SEGMENTS):
        if r.at_end():
            break  # no trailer: decoders stop here too
        block = r.read(1)[0]
        if block == 0x3B:
            break
        if block == 0x21:
            if r.read(1)[0] == 0xF9:  # graphic control: its first data byte holds the transparency flag
                size = r.read(1)[0]
                if size:
                    flags = r.read(1)[0]
                    alpha = alpha or bool(flags & 1)
                    r.skip(size - 1)
                    sub_blocks.skip(r)
            else:
                sub_blocks.skip(r)
        elif block == 0x2C:
            x, y, fw, fh, fflags = struct.unpack("<HHHHB", r.read(9))
            frames += 1
            canvas_w, canvas_h = max(canvas_w, x + fw), max(canvas_h, y + fh)
            check_pixels(canvas_w, canvas_h, limits,
                         "The image" if frames == 1 else f"The canvas grown by frame {frames}")
            if fflags & 0x80:
                r.skip(3 << ((fflags & 7) + 1))
            code_size = r.read(1)[0]
            if not 1 <= code_size <= 12:
                raise _invalid("GIF", f"LZW code size {code_size} in frame {frames}")
            sub_blocks.skip(r)
            if frames > limits.max_frames:
                break  # past the limit only the first frame is decoded
        else:
            raise _invalid("GIF", f"unknown block 0x{block:02x}")
    else:
        raise _invalid("GIF", f"more than {MAX_SEGMENTS:,} blocks")
    if frames == 0:
        raise _invalid("GIF", "no image data")
    check_animation("gif", frames, canvas_w, canvas_h, limits)
    return Header("gif", canvas_w, canvas_h, frames, alpha=alpha)


# --- WebP ------------------------------------------------------------------------------------
def _webp(r: _Reader, limits: "Limits") -> Header:
    """Walk the RIFF chunks: the VP8X canvas, every ANMF frame's rectangle
    and the size each bitstream declares, against the canvas and the limits."""
    riff_size = struct.unpack("<I", r.read(8)[4:8])[0]
    r.skip(4)
    end = 8 + riff_size
    if riff_size < 4 or end > r.size:
        raise _Truncated
    r.size = end  # decoders ignore what follows the RIFF
    canvas: tuple[int, int] | None = None
    animated = False
    frames = 0
    alpha = False
    first = True
    for _ in range(MAX_SEGMENTS):
        if r.at_end():
            break
        kind, length = struct.unpack("<4sI", r.read(8))
        padded = length + (length & 1)
        if kind == b"VP8X" and first:
            if length < 10:
                raise _invalid("WebP", "short VP8X chunk")
            body = r.read(10)
            animated = bool(body[0] & 0x02)
            alpha = bool(body[0] & 0x10)
            cw = int.from_bytes(body[4:7], "little") + 1
            ch = int.from_bytes(body[7:10], "little") + 1
            check_pixels(cw, ch, limits)
            canvas = (cw, ch)
            r.skip(padded - 10)
        elif kind == b"ANMF" and animated:
            if length < 16 + 8:
                raise _invalid("WebP", "short frame chunk")
            body = r.read(16)
            fx, fy = int.from_bytes(body[0:3], "little") * 2, int.from_bytes(body[3:6], "little") * 2
            fw, fh = int.from_bytes(body[6:9], "little") + 1, int.from_bytes(body[9:12], "little") + 1
            frames += 1
            assert canvas is not None
            if fx + fw > canvas[0] or fy + fh > canvas[1]:
                raise _invalid("WebP", f"frame {frames} is {fw}x{fh} at {fx},{fy} on a {canvas[0]}x{canvas[1]} canvas")
            _webp_frame(r, length - 16, (fw, fh), limits, frames)
            r.skip(padded - length)
            if frames > limits.max_frames:
                break
        elif kind in (b"VP8 ", b"VP8L") and not animated:
            head = r.read(min(length, 10))
            size = _bitstream_size(kind, head)
            if kind == b"VP8L" and canvas is None:  # a simple lossless file: alpha_is_used bit
                alpha = bool(int.from_bytes(head[1:5], "little") >> 28 & 1)
            r.skip(padded - min(length, 10))
            check_pixels(*size, limits)
            if canvas is not None and size != canvas:
                raise _invalid("WebP", f"the picture is {size[0]}x{size[1]} on a {canvas[0]}x{canvas[1]} canvas")
            canvas = size
            frames = 1
            break  # the picture; what follows is metadata
        else:
            r.skip(padded)
        first = False
    else:
        raise _invalid("WebP", f"more than {MAX_SEGMENTS:,} chunks")
    if canvas is None or frames == 0:
        raise _invalid("WebP", "no image data")
    check_animation("webp", frames, canvas[0], canvas[1], limits)
    return Header("webp", canvas[0], canvas[1], frames, alpha=alpha)


def _bitstream_size(kind: bytes, head: bytes) -> tuple[int, int]:
    if kind == b"VP8 ":
        if len(head) < 10 or head[3:6] != b"\x9d\x01\x2a":
            raise _invalid("WebP", "bad VP8 header")
        w, h = struct.unpack("<HH", head[6:10])
        return w & 0x3FFF, h & 0x3FFF
    if len(head) < 5 or head[0] != 0x2F:
        raise _invalid("WebP", "bad VP8L header")
    bits = int.from_bytes(head[1:5], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _webp_frame(r: _Reader, length: int, size: tuple[int, int], limits: "Limits", index: int) -> None:
    """The chunks inside an ANMF frame: optional ALPH, then VP8 or VP8L,
    whose declared size must be the frame's."""
    end = r.pos + length
    if end > r.size:
        raise _Truncated
    while r.pos + 8 <= end:
        kind, sub = struct.unpack("<4sI", r.read(8))
        padded = sub + (sub & 1)
        if kind in (b"VP8 ", b"VP8L"):
            got = _bitstream_size(kind, r.read(min(sub, 10)))
            if got != size:
                raise _invalid("WebP", f"frame {index} declares {size[0]}x{size[1]} but holds {got[0]}x{got[1]}")
            r.pos = end
            return
        if r.pos + padded > end:
            break
        r.skip(padded)
    raise _invalid("WebP", f"frame {index} has no picture")


_WALKERS = {"jpeg": _jpeg, "png": _png, "gif": _gif, "webp": _webp}
