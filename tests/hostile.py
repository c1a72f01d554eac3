"""Generators of hostile images (issue 15: CPU bombs, frames larger than the
canvas, probing bombs, metadata hidden where a naive stripper misses it).
Each returns bytes; sizes are parameters so that a quick variant runs in
every CI run and the full size under ``-m slow``.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) & 1 else b"")


def jpeg_scan_bomb(size: tuple[int, int], scans: int) -> bytes:
    """A valid progressive JPEG (flat grey) followed by ``scans`` more AC
    scans with (almost) no data: tiny on disk, each a full pass for libjpeg."""
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    assert data.endswith(b"\xff\xd9")
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00" + b"\x00"  # 1 component, Ss=1 Se=63
    return data[:-2] + sos * scans + b"\xff\xd9"


# A minimal 2-bit LZW stream for one pixel: clear, index 0, end (code size 3 bits).
_LZW_1PX = b"\x02\x02\x44\x01\x00"


def gif_bytes(screen: tuple[int, int], frames: list[tuple[int, int, int, int]], trailer: bool = True) -> bytes:
    """A GIF with a 2-colour global table and one image descriptor per
    ``(x, y, w, h)``; each frame's data is one pixel (decoders fill the rest)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", screen[0], screen[1], 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for x, y, w, h in frames:
        out += b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # graphic control: 100 ms
        out += b"\x2c" + struct.pack("<HHHHB", x, y, w, h, 0) + _LZW_1PX
    if trailer:
        out += b"\x3b"
    return bytes(out)


@functools.lru_cache(maxsize=8)
def _gif_frame(size: tuple[int, int], index: int = 0) -> bytes:
    """One image descriptor and its LZW data, as Pillow encodes a flat frame
    (a real, decodable stream: about 75 KB for 9999x9999)."""
    im = Image.new("P", size, index)
    im.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    im.save(buf, "GIF")
    data = buf.getvalue()
    start = 13 + 3 * (2 << (data[10] & 7))  # after the header and global colour table
    while data[start] == 0x21:  # skip extensions
        start += 2
        while data[start]:
            start += data[start] + 1
        start += 1
    assert data[start] == 0x2C and data.endswith(b";")
    return data[start:-1]


def gif_frames_beyond_canvas(screen: int = 100, big: int = 9999, count: int = 39) -> bytes:
    """Issue 15 item 9: a small screen, then frames declaring a huge size
    (decodable, so a decoder that trusts them really grows its canvas)."""
    head = gif_bytes((screen, screen), [], trailer=False)
    gce = b"\x21\xf9\x04\x04\x0a\x00\x00\x00"
    return head + gce + _gif_frame((screen, screen)) + (gce + _gif_frame((big, big), 1)) * count + b";"


def gif_many_tiny_frames(count: int) -> bytes:
    """Issue 15 item 10: millions of 1x1 frames, cheap on disk, slow to count."""
    head = gif_bytes((1, 1), [], trailer=False)
    frame = b"\x21\xf9\x04\x04\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + _LZW_1PX
    return head + frame * count + b"\x3b"


def png_ztxt_bomb(chunks: int, inflated: int = 1 << 20, size: tuple[int, int] = (16, 16)) -> bytes:
    """Issue 15 item 10: zTXt chunks before IDAT that inflate to ``inflated``
    bytes each (Pillow inflates up to 64 MB of them on open)."""
    good = _png(size)
    packed = zlib.compress(b"A" * inflated, 9)
    text = b"".join(png_chunk(b"zTXt", b"Comment%d\x00\x00" % i + packed) for i in range(chunks))
    return good[:33] + text + good[33:]


def _png(size: tuple[int, int], **save) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, "PNG", **save)
    return buf.getvalue()


def apng_frame_beyond_canvas() -> bytes:
    """An APNG whose second frame control declares a rectangle past the canvas."""
    frames = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    data = bytearray(buf.getvalue())
    pos = data.index(b"fcTL", data.index(b"IDAT"))  # the second frame's control
    data[pos + 8:pos + 12] = struct.pack(">I", 9999)  # width
    body = bytes(data[pos:pos + 4 + 26])
    data[pos + 30:pos + 34] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


def webp_frame_beyond_canvas() -> bytes:
    """An animated WebP whose second ANMF rectangle declares 9999x9999 on a 32x32 canvas."""
    frames = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buf.getvalue())
    pos = data.index(b"ANMF", data.index(b"ANMF") + 4)
    data[pos + 14:pos + 17] = (9998).to_bytes(3, "little")
    data[pos + 17:pos + 20] = (9998).to_bytes(3, "little")
    return bytes(data)


def png_corrupt_deflate(size: tuple[int, int] = (120, 80)) -> bytes:
    """A PNG whose structure is sound (chunks, lengths, CRCs) but whose
    deflate stream is garbage: it passes the upload check, only a decode
    finds the problem."""
    good = _png(size)
    pos = good.index(b"IDAT")
    length = struct.unpack(">I", good[pos - 4:pos])[0]
    data = bytearray(good[pos + 4:pos + 4 + length])
    data[2:12] = b"\xff" * 10
    return good[:pos - 4] + png_chunk(b"IDAT", bytes(data)) + good[pos + 8 + length:]
