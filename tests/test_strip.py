"""The keep-the-original path (issue 15 item 11): metadata hidden anywhere
in the structure is dropped, only picture-defining parts are kept, and the
stripped file is used only when it decodes to the same pixels."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageChops

import hostile
from imgworker import imaging
from imgworker.imaging import Limits, process
from imgworker.probe import inspect
from imgworker.strip import strip
from imgworker.views import result_view

SECRET = b"GPS 48.8584N 2.2945E secret"


def app(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


EXIF_GPS = app(0xE1, b"Exif\x00\x00" + SECRET)
COM = app(0xFE, SECRET)


def noisy_jpeg(progressive: bool) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((120, 90), 50).convert("RGB").save(buf, "JPEG", quality=30, progressive=progressive)
    return buf.getvalue()


def insert_before_scan(data: bytes, n: int, segment: bytes) -> bytes:
    """``segment`` placed just before the n-th scan (0-based)."""
    pos = -1
    for _ in range(n + 1):
        pos = data.index(b"\xff\xda", pos + 1)
    return data[:pos] + segment + data[pos:]


def jfif_with_thumbnail(data: bytes) -> bytes:
    thumb = bytes(range(48)) * 2  # 4x8 RGB thumbnail pixels
    jfif = app(0xE0, b"JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x08\x04" + thumb)
    jfxx = app(0xE0, b"JFXX\x00\x13" + SECRET)
    return data[:2] + jfif + jfxx + data[data.index(b"\xff", 2 + 2 + 16):]


def _jpeg_cases():
    base, prog = noisy_jpeg(False), noisy_jpeg(True)
    return {
        "exif after the only scan": base[:-2] + EXIF_GPS + b"\xff\xd9",
        "COM after the only scan": base[:-2] + COM + b"\xff\xd9",
        "GPS between progressive scans": insert_before_scan(prog, 2, EXIF_GPS),
        "COM between progressive scans": insert_before_scan(prog, 4, COM),
        "JFXX and JFIF thumbnails": jfif_with_thumbnail(base),
        "trailing COM holding FF D9": base[:-2] + app(0xFE, b"x\xff\xd9" + SECRET) + b"\xff\xd9",
        "APP15 before the frame": base[:2] + app(0xEF, SECRET) + base[2:],
        "payload after EOI": base + SECRET,
    }


def _png_cases():
    good = Image.effect_noise((60, 40), 50).convert("RGB")
    buf = io.BytesIO()
    good.save(buf, "PNG")
    png = buf.getvalue()
    ancillary = b"".join(hostile.png_chunk(kind, body) for kind, body in [
        (b"tEXt", b"Comment\x00" + SECRET), (b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + SECRET),
        (b"eXIf", b"MM\x00*" + SECRET), (b"tIME", b"\x07\xe8\x01\x01\x00\x00\x00"), (b"prVt", SECRET),
        (b"pHYs", b"\x00\x00\x0b\x13\x00\x00\x0b\x13\x01")])
    idat = png.index(b"IDAT") - 4
    return {
        "chunks before the image data": png[:idat] + ancillary + png[idat:],
        "chunks after the image data": png[:-12] + ancillary + png[-12:],
        "bytes after IEND": png + SECRET,
    }


def _webp_cases():
    out = {}
    for name, save in (("lossy", {"quality": 30}), ("lossless", {"lossless": True})):
        buf = io.BytesIO()
        Image.effect_noise((60, 40), 50).convert("RGB").save(buf, "WEBP", **save)
        data = buf.getvalue()
        vp8x = hostile.riff_chunk(b"VP8X", b"\x2c\x00\x00\x00" + (59).to_bytes(3, "little") + (39).to_bytes(3, "little"))
        body = b"WEBP" + vp8x + data[12:] + hostile.riff_chunk(b"EXIF", SECRET) + hostile.riff_chunk(b"XMP ", SECRET) \
            + hostile.riff_chunk(b"GPSx", SECRET)
        out[f"{name} with EXIF, XMP and unknown chunks"] = b"RIFF" + struct.pack("<I", len(body)) + body
    frames = [Image.effect_noise((40, 30), 50).convert("RGB") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], quality=30, duration=80)
    anim = bytearray(buf.getvalue())
    pos = anim.index(b"ANMF")
    length = struct.unpack("<I", anim[pos + 4:pos + 8])[0]
    extra = hostile.riff_chunk(b"GPSx", SECRET)  # an unknown chunk inside the first frame
    anim[pos + 4:pos + 8] = struct.pack("<I", length + len(extra))
    anim[pos + 8 + length:pos + 8 + length] = extra
    anim += hostile.riff_chunk(b"GPSy", SECRET)
    anim[4:8] = struct.pack("<I", len(anim) - 8)
    out["animation with unknown chunks"] = bytes(anim)
    return out


CASES = {**{f"jpeg: {k}": ("jpeg", v) for k, v in _jpeg_cases().items()},
         **{f"png: {k}": ("png", v) for k, v in _png_cases().items()},
         **{f"webp: {k}": ("webp", v) for k, v in _webp_cases().items()}}


def frames_of(data: bytes) -> list[Image.Image]:
    with Image.open(io.BytesIO(data)) as im:
        out = []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            out.append(im.convert("RGBA").copy())
        return out


def same_pixels(a: bytes, b: bytes) -> bool:
    fa, fb = frames_of(a), frames_of(b)
    return len(fa) == len(fb) and all(ImageChops.difference(x, y).getbbox() is None for x, y in zip(fa, fb))


@pytest.mark.parametrize("name", sorted(CASES))
def test_strip_walks_the_whole_structure(name):
    fmt, data = CASES[name]
    assert SECRET in data
    out = strip(data, fmt)
    assert out is not None, "a decodable file can be walked to its end"
    assert SECRET not in out and b"Exif" not in out and b"JFXX" not in out
    assert same_pixels(out, data)
    if fmt == "jpeg":
        assert out.endswith(b"\xff\xd9") and out.count(b"\xff\xda") == data.count(b"\xff\xda")
        assert b"\xff\xfe" not in out and not any(bytes([0xFF, m]) in out for m in range(0xE1, 0xEE))


@pytest.mark.parametrize("name", sorted(CASES))
def test_original_output_never_carries_metadata(tmp_path, name):
    fmt, data = CASES[name]
    src = tmp_path / "in"
    src.write_bytes(data)
    result = result_view("j", "in", process(src, tmp_path, "j", {"format": "original", "quality": 100}, Limits()))
    path = tmp_path / result["processedFile"]["filename"]
    out = path.read_bytes()
    assert SECRET not in out
    inspect(path, Limits())  # a well-formed file to its end (not cut inside a segment)
    assert same_pixels(out, data) or not result["optimization"]["keptOriginalEncoding"]


def test_jpeg_original_is_kept_when_smaller(tmp_path):
    fmt, data = CASES["jpeg: GPS between progressive scans"]
    src = tmp_path / "in"
    src.write_bytes(data)
    result = result_view("j", "in", process(src, tmp_path, "j", {"format": "original", "quality": 100}, Limits()))
    assert result["optimization"]["keptOriginalEncoding"] is True


def test_a_stripped_file_that_decodes_differently_is_not_kept(tmp_path, monkeypatch):
    """The pixel check: a stripper bug (here: it returns another, smaller
    picture) falls back to the re-encoded output."""
    _, data = CASES["jpeg: COM after the only scan"]
    other = io.BytesIO()
    Image.new("RGB", (120, 90), (0, 0, 0)).save(other, "JPEG", quality=10)
    monkeypatch.setattr(imaging, "strip", lambda raw, fmt: other.getvalue())
    src = tmp_path / "in"
    src.write_bytes(data)
    result = result_view("j", "in", process(src, tmp_path, "j", {"format": "original", "quality": 100}, Limits()))
    assert result["optimization"]["keptOriginalEncoding"] is False
    out = (tmp_path / result["processedFile"]["filename"]).read_bytes()
    assert out != other.getvalue() and SECRET not in out


def test_unwalkable_structures_give_none():
    base = noisy_jpeg(False)
    assert strip(base[:-2], "jpeg") is None  # no EOI
    assert strip(base[:200], "jpeg") is None
    png = _png_cases()["bytes after IEND"]
    assert strip(png[:-len(SECRET) - 12], "png") is None  # no IEND
    webp = _webp_cases()["lossy with EXIF, XMP and unknown chunks"]
    assert strip(webp[:-10], "webp") is None
