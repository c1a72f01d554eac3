"""Structural probing (imgworker/probe.py): every declared size is checked
before any decoder runs, in bounded time and memory, whatever the lengths
and counts in the file claim (issue 15 items 7, 9, 10)."""

from __future__ import annotations

import io
import random
import struct
import time
import tracemalloc

import pytest
from PIL import Image

import hostile
from helpers import image_bytes
from imgworker.errors import ImageError
from imgworker.imaging import Limits, probe, process
from imgworker.probe import inspect


def check(tmp_path, data: bytes, limits=Limits(), name="in"):
    src = tmp_path / name
    src.write_bytes(data)
    return inspect(src, limits)


def refused(tmp_path, data: bytes, limits=Limits()) -> ImageError:
    with pytest.raises(ImageError) as err:
        check(tmp_path, data, limits)
    assert not err.value.transient
    return err.value


# --- item 7: CPU bombs from the JPEG structure ------------------------------------------------
def test_jpeg_scan_bomb_is_refused_from_its_structure(tmp_path):
    bomb = hostile.jpeg_scan_bomb((1000, 1000), 300)
    err = refused(tmp_path, bomb)
    assert err.code == "IMAGE_TOO_LARGE" and "100 scans" in err.message
    # ordinary progressive and baseline files are far below the cap
    for data in (image_bytes("JPEG", (300, 200), progressive=True), image_bytes("JPEG", (300, 200)),
                 image_bytes("JPEG", (64, 64), mode="CMYK", color=(0, 0, 0, 0), progressive=True)):
        assert 1 <= check(tmp_path, data).scans <= 20
    # the cap is a setting, and exactly at it passes
    base = check(tmp_path, hostile.jpeg_scan_bomb((64, 64), 0)).scans
    assert check(tmp_path, hostile.jpeg_scan_bomb((64, 64), 20), Limits(max_jpeg_scans=base + 20)).scans == base + 20
    assert refused(tmp_path, hostile.jpeg_scan_bomb((64, 64), 21), Limits(max_jpeg_scans=base + 20)).code == "IMAGE_TOO_LARGE"


def test_jpeg_scans_are_counted_past_metadata_and_stray_bytes(tmp_path):
    """Scans hidden after COM/APP segments, restart markers, stuffed bytes
    and junk between segments are still counted (as libjpeg reads them)."""
    bomb = bytearray(hostile.jpeg_scan_bomb((64, 64), 150))
    first_sos = bomb.index(b"\xff\xda")
    bomb[first_sos:first_sos] = b"\xff\xfe\x00\x06\xff\xd9\xff\xda" + b"\xff\xe1\x00\x04ab"  # a COM holding EOI+SOS
    assert refused(tmp_path, bytes(bomb)).code == "IMAGE_TOO_LARGE"
    junk = bytes(bomb).replace(b"\xff\xda\x00\x08", b"\x00\x00\xff\xd3\xff\x00\xff\xda\x00\x08")
    assert refused(tmp_path, junk).code == "IMAGE_TOO_LARGE"


def test_jpeg_structure_errors(tmp_path):
    good = image_bytes("JPEG", (64, 64))
    sof = good.index(b"\xff\xc0")
    cases = {
        "second frame header": good[:sof] + good[sof:sof + 19] + good[sof:],
        "DNL height": good[:sof + 5] + b"\x00\x00" + good[sof + 7:],
        "length past the end": good[:sof + 2] + b"\xff\xff" + good[sof + 4:sof + 40],
        "length 0": good[:sof + 2] + b"\x00\x00" + good[sof + 4:],
        "no scan": good[:good.index(b"\xff\xda")] + b"\xff\xd9",
        "no EOI": good[:-2],
    }
    for why, data in cases.items():
        assert refused(tmp_path, data).code == "INVALID_IMAGE", why


# --- item 9: every frame's declared size -----------------------------------------------------
def test_gif_frames_larger_than_the_screen_are_refused_before_decoding(tmp_path):
    bomb = hostile.gif_frames_beyond_canvas(screen=100, big=3000, count=5)
    small = Limits(max_input_pixels=4_000_000)
    err = refused(tmp_path, bomb, small)
    assert err.code == "IMAGE_TOO_LARGE" and "frame 2" in err.message
    # within the pixel limit, the grown canvas counts in the frames x canvas budget
    err = refused(tmp_path, bomb, Limits(max_animation_pixels=20_000_000))
    assert err.code == "IMAGE_TOO_LARGE" and "3000x3000" in err.message
    # and the pipeline refuses it without decoding a pixel
    with pytest.raises(ImageError) as exc:
        process(tmp_path / "in", tmp_path, "j", {}, small)
    assert exc.value.code == "IMAGE_TOO_LARGE"


@pytest.mark.parametrize("make", [hostile.apng_frame_beyond_canvas, hostile.webp_frame_beyond_canvas])
def test_animation_frames_outside_the_canvas_are_refused(tmp_path, make):
    err = refused(tmp_path, make())
    assert err.code == "INVALID_IMAGE" and "frame 2" in err.message


def test_webp_picture_larger_than_its_canvas(tmp_path):
    data = bytearray(image_bytes("WEBP", (40, 30), lossless=True))
    vp8x = hostile.riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + (9).to_bytes(3, "little") + (9).to_bytes(3, "little"))
    body = b"WEBP" + vp8x + bytes(data[12:])
    err = refused(tmp_path, b"RIFF" + struct.pack("<I", len(body)) + body)
    assert err.code == "INVALID_IMAGE" and "40x30" in err.message


def test_every_format_reports_the_canvas_and_frames(tmp_path):
    frames = [Image.new("RGB", (30, 20), (i * 40, 0, 0)) for i in range(4)]
    for fmt, save in (("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 50})):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, **save)
        header = check(tmp_path, buf.getvalue())
        assert (header.width, header.height, header.frames) == (30, 20, 4), fmt
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        header = check(tmp_path, image_bytes(fmt, (33, 17)))
        assert (header.width, header.height, header.frames) == (33, 17, 1), fmt


# --- item 10: bounded in time and memory ----------------------------------------------------
def test_probe_never_inflates_text_chunks(tmp_path):
    src = tmp_path / "ztxt.png"
    src.write_bytes(hostile.png_ztxt_bomb(20))  # 20 MB of text once inflated
    tracemalloc.start()
    try:
        header = probe(src, Limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.format == "png" and peak < 1_000_000, peak


def test_probe_stops_counting_frames_at_the_limit(tmp_path):
    src = tmp_path / "many.gif"
    src.write_bytes(hostile.gif_many_tiny_frames(100_000))
    started = time.monotonic()
    header = probe(src, Limits(max_frames=1000))
    assert header.frames == 1001  # more than the limit: the rest is never walked
    assert time.monotonic() - started < 2
    # an APNG declaring 2**31 frames is not walked either
    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    apng = buf.getvalue().replace(b"acTL\x00\x00\x00\x03", b"acTL\x80\x00\x00\x00")
    apng = apng[:apng.index(b"acTL") - 4] + hostile.png_chunk(b"acTL", apng[apng.index(b"acTL") + 4:apng.index(b"acTL") + 12]) \
        + apng[apng.index(b"acTL") + 16:]
    assert check(tmp_path, apng).frames == 1001


def test_segment_and_block_counts_are_bounded(tmp_path):
    gif = bytearray(hostile.gif_bytes((4, 4), [(0, 0, 4, 4)], trailer=False))
    gif[-1:] = b"\x01\x00" * 1_100_000 + b"\x00"  # a frame of 1-byte sub-blocks
    err = refused(tmp_path, bytes(gif))
    assert err.code == "INVALID_IMAGE" and "sub-blocks" in err.message
    jpeg = image_bytes("JPEG", (8, 8))
    err = refused(tmp_path, jpeg[:2] + b"\xff\xfe\x00\x02" * 100_001 + jpeg[2:])
    assert err.code == "INVALID_IMAGE" and "segments" in err.message


def test_image_data_chunks_of_a_still_png_are_counted(tmp_path):
    """The probe walks a still PNG's whole image data: each chunk costs
    Pillow a Python step, so 100,000 of them are refused (a 48 MB upload of
    empty ones cost a worker 5 s); thousands, as libpng writes, pass."""
    png = image_bytes("PNG", (64, 48))
    start = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[start:start + 4])[0]
    end = start + 12 + length
    empty = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", 0x35AF061E)  # crc32(b"IDAT")
    many = png[:end] + empty * 100_001 + png[end:]
    err = refused(tmp_path, many)
    assert err.code == "INVALID_IMAGE" and "chunks" in err.message
    assert check(tmp_path, png[:end] + empty * 5_000 + png[end:]).width == 64


def _samples() -> list[bytes]:
    frames = [Image.new("RGB", (24, 16), (i * 50, 9, 9)) for i in range(3)]
    out = [image_bytes("JPEG", (40, 30), progressive=True), image_bytes("PNG", (40, 30)), image_bytes("GIF", (40, 30)),
           image_bytes("WEBP", (40, 30)), image_bytes("WEBP", (40, 30), lossless=True)]
    for fmt in ("GIF", "PNG", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        out.append(buf.getvalue())
    return out


def test_truncations_and_lying_fields_only_ever_give_image_errors(tmp_path):
    """Attack the parser: every truncation, and big or zero integers written
    over every header position, give a deterministic ImageError or a header
    that Pillow agrees with, never another exception, and quickly."""
    rng = random.Random(3)
    started = time.monotonic()
    outcomes = {"ok": 0, "refused": 0}
    for data in _samples():
        variants = [data[:cut] for cut in range(1, len(data))]
        for _ in range(150):
            b = bytearray(data)
            i = rng.randrange(min(len(b) - 4, 120))
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x01\x00"])
            variants.append(bytes(b))
        for variant in variants:
            try:
                header = check(tmp_path, variant)
            except ImageError as exc:
                assert exc.code in ("INVALID_IMAGE", "IMAGE_TOO_LARGE", "UNSUPPORTED_FORMAT"), exc
                outcomes["refused"] += 1
                continue
            outcomes["ok"] += 1
            assert header.width * header.height <= Limits().max_input_pixels
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0
    assert time.monotonic() - started < 30


def test_alpha_is_read_from_the_structure(tmp_path):
    """The API chooses format=auto from the probe alone: transparency must be
    seen as Pillow sees it (alpha channel, tRNS, GIF transparent index)."""
    cases = [
        (image_bytes("PNG", (8, 8), mode="RGBA", color=(1, 2, 3, 4)), True),
        (image_bytes("PNG", (8, 8), mode="LA", color=(1, 2)), True),
        (image_bytes("PNG", (8, 8), mode="RGB", transparency=(1, 2, 3)), True),
        (image_bytes("PNG", (8, 8)), False),
        (image_bytes("GIF", (8, 8), mode="P", color=1, transparency=1), True),
        (image_bytes("GIF", (8, 8)), False),
        (image_bytes("WEBP", (8, 8), mode="RGBA", color=(1, 2, 3, 4), lossless=True), True),
        (image_bytes("WEBP", (8, 8), mode="RGBA", color=(1, 2, 3, 4), quality=50), True),
        (image_bytes("WEBP", (8, 8), lossless=True), False),
        (image_bytes("WEBP", (8, 8)), False),
        (image_bytes("JPEG", (8, 8)), False),
    ]
    for data, alpha in cases:
        header = probe(_write(tmp_path, data), Limits())
        assert header.alpha is alpha, (data[:16], header)


def _write(tmp_path, data):
    path = tmp_path / "alpha"
    path.write_bytes(data)
    return path
