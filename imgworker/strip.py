"""Lossless metadata stripping for the keep-the-original path.

Contract: :func:`strip` rebuilds a JPEG, PNG, WebP or GIF file from the parts
that define the picture only, walking its whole structure (every segment and
scan of a JPEG up to EOI, every PNG chunk up to IEND, every RIFF chunk and
the chunks inside each animation frame, every GIF block up to the trailer), and returns the new bytes, or None
when the structure cannot be walked to its end (the caller then re-encodes).
Nothing is copied by default: a part is kept only when it is on the list of
picture-defining parts, so metadata placed where a naive stripper stops
looking (after the first scan, between progressive scans, in a JFIF
thumbnail, in an unknown chunk, after the end marker) is dropped.

It is pure bytes in, bytes out; the caller verifies that the result decodes
to the same pixels before using it (imaging.py).
"""

from __future__ import annotations

import re
import struct

# JPEG markers kept: frame headers (SOFn), Huffman and quantisation tables,
# restart interval, arithmetic conditioning, scans. APP0 (JFIF) and APP14
# (Adobe: the colour transform) are rebuilt to their fixed fields.
_JPEG_KEEP = frozenset(range(0xC0, 0xD0)) | {0xDB, 0xDD, 0xDA}
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker after entropy-coded data

# PNG chunks that define the picture (colour space chunks change how the
# pixels look; iCCP never reaches here: a profile means re-encoding to sRGB).
PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"cICP",
                      b"acTL", b"fcTL", b"fdAT"})

# WebP: the VP8X flags that announce metadata chunks (ICC, EXIF, XMP).
_VP8X_METADATA = 0x20 | 0x08 | 0x04


def strip(data: bytes, fmt: str) -> bytes | None:
    """``data`` without metadata, or None when it cannot be walked to its end."""
    try:
        if fmt == "jpeg":
            return strip_jpeg(data)
        if fmt == "png":
            return strip_png(data)
        if fmt == "webp":
            return strip_webp(data)
        if fmt == "gif":
            return strip_gif(data)
    except (IndexError, struct.error, ValueError):
        return None
    return None


def strip_jpeg(data: bytes) -> bytes | None:
    """Walk SOI .. EOI: keep the frame header, tables, restart intervals and
    every scan with its entropy-coded data; rebuild JFIF (no thumbnail) and
    Adobe APP14 to their fixed fields; drop APP1-APP13, APP15, COM, JFXX
    thumbnails, unknown markers and everything after EOI."""
    if data[:2] != b"\xff\xd8":
        return None
    out = [b"\xff\xd8"]
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:  # stray bytes: libjpeg skips them to the next marker
            match = _JPEG_MARKER.search(data, pos)
            if not match:
                return None
            pos = match.start()
        while pos + 1 < end and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= end:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            pos += 2  # restart / TEM markers outside a scan carry nothing
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        seg_end = pos + 2 + length
        if length < 2 or seg_end > end:
            return None
        body = data[pos + 4:seg_end]
        if marker == 0xDA:  # a scan: its header, then entropy-coded data up to the next marker
            match = _JPEG_MARKER.search(data, seg_end)
            if not match:
                return None
            out.append(data[pos:match.start()])
            pos = match.start()
            continue
        if marker in _JPEG_KEEP:
            out.append(data[pos:seg_end])
        elif marker == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 14:
            # version, units, densities; thumbnail size 0x0 (a thumbnail is another picture)
            out.append(b"\xff\xe0\x00\x10" + body[:12] + b"\x00\x00")
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            out.append(b"\xff\xee\x00\x0e" + body[:12])
        pos = seg_end
    return None


def strip_png(data: bytes) -> bytes | None:
    """Keep the picture-defining chunks in order, through IEND; drop text,
    eXIf, time, unknown and private chunks, and anything after IEND."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    out = [data[:8]]
    pos = 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        chunk_end = pos + 12 + length
        if chunk_end > len(data):
            return None
        if kind in PNG_KEEP:
            out.append(data[pos:chunk_end])
        if kind == b"IEND":
            return b"".join(out)
        pos = chunk_end
    return None


def _riff(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")


def _chunks(data: bytes, start: int, end: int):
    """(fourcc, payload) of the RIFF chunks in data[start:end]; ValueError
    when a length points past the end."""
    pos = start
    while pos + 8 <= end:
        kind = data[pos:pos + 4]
        length = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if pos + 8 + length > end:
            raise ValueError("chunk past the end")
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 8 + length + (length & 1)
    if pos < end and end - pos > 1:  # leftover bytes that are not a chunk
        raise ValueError("stray bytes")


def strip_webp(data: bytes) -> bytes | None:
    """Rebuild the RIFF from VP8X (metadata flags cleared), ANIM, ANMF
    (keeping only ALPH and the bitstream inside each frame), ALPH, VP8 and
    VP8L; drop ICCP, EXIF, XMP and unknown chunks, and bytes after the RIFF."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    end = 8 + struct.unpack("<I", data[4:8])[0]
    if end > len(data):
        return None
    out = []
    for kind, payload in _chunks(data, 12, end):
        if kind == b"VP8X" and len(payload) >= 10:
            out.append(_riff(kind, bytes([payload[0] & ~_VP8X_METADATA]) + payload[1:10]))
        elif kind in (b"ANIM", b"ALPH", b"VP8 ", b"VP8L"):
            out.append(_riff(kind, payload))
        elif kind == b"ANMF" and len(payload) >= 16:
            inner = [_riff(k, p) for k, p in _chunks(payload, 16, len(payload)) if k in (b"ALPH", b"VP8 ", b"VP8L")]
            out.append(_riff(kind, payload[:16] + b"".join(inner)))
    if not out:
        return None
    body = b"WEBP" + b"".join(out)
    return b"RIFF" + struct.pack("<I", len(body)) + body


GIF_KEEP_APPS = (b"NETSCAPE2.0", b"ANIMEXTS1.0")  # the loop count; every other application block is metadata


def strip_gif(data: bytes) -> bytes | None:
    """Keep the screen, colour tables, frames, graphic controls, plain text and
    the loop extension; drop comments and application blocks (XMP, ICC,
    anything else); cut anything after the trailer. None if malformed."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        return None
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    out = bytearray(data[:pos])

    def blocks_end(at: int) -> int:  # end of a chain of data sub-blocks (after its 0 terminator)
        while data[at]:
            at += 1 + data[at]
        return at + 1

    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:  # trailer
            out += b"\x3b"
            return bytes(out)
        if kind == 0x21:  # extension: label, then sub-blocks
            label = data[pos + 1]
            end = blocks_end(pos + 2)
            app = data[pos + 3 : pos + 14] if label == 0xFF and data[pos + 2] == 11 else b""
            if label in (0xF9, 0x01) or app in GIF_KEEP_APPS:
                out += data[pos:end]
            pos = end
        elif kind == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            flags = data[pos + 9]
            start = pos + 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            end = blocks_end(start + 1)
            out += data[pos:end]
            pos = end
        else:
            return None
        if pos > len(data):
            return None
    return None
