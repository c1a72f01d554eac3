"""The Pillow pipeline on generated fixtures (and the shared corpus when present)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, ImageChops

from imgworker import imaging
from imgworker.errors import ImageError
from imgworker.imaging import Limits, fit, probe, process, sniff
from imgworker.views import result_view

from helpers import SRGB_COLORANTS, image_bytes, matrix_icc, srgb_curve, swapped_icc, table_curve

LIMITS = Limits()


def run(tmp_path, data: bytes, limits=LIMITS, name="in", **options):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = result_view("job1", name, process(src, out, "job1", options, limits))
    path = out / result["processedFile"]["filename"]
    return result, path


def quadrants(size=(80, 40)):
    """Landscape test card: red top-left, green top-right, blue bottom-left, white bottom-right."""
    im = Image.new("RGB", size)
    w, h = size
    for box, color in [((0, 0, w // 2, h // 2), (255, 0, 0)), ((w // 2, 0, w, h // 2), (0, 255, 0)),
                       ((0, h // 2, w // 2, h), (0, 0, 255)), ((w // 2, h // 2, w, h), (255, 255, 255))]:
        im.paste(color, box)
    return im


# Pixel transform that a camera stores so that applying `orientation` shows the card upright.
STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


def color_at(im, x, y):
    return im.convert("RGB").getpixel((x, y))


def close(c1, c2, tol=60):
    return all(abs(a - b) <= tol for a, b in zip(c1, c2))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_come_out_upright(tmp_path, orientation):
    stored = STORED[orientation](quadrants())
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    result, path = run(tmp_path, buf.getvalue())
    out = Image.open(path)
    assert out.size == (80, 40)
    assert result["processedFile"]["dimensions"] == {"width": 80, "height": 40}
    assert close(color_at(out, 10, 5), (255, 0, 0)) and close(color_at(out, 70, 5), (0, 255, 0))
    assert close(color_at(out, 10, 35), (0, 0, 255)) and close(color_at(out, 70, 35), (255, 255, 255))


def test_two_by_one_orientation_8_becomes_one_by_two(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.new("RGB", (2, 1), "red").save(buf, "JPEG", exif=exif.tobytes())
    result, path = run(tmp_path, buf.getvalue(), format="png")
    assert Image.open(path).size == (1, 2)
    assert result["originalFile"]["dimensions"] == {"width": 1, "height": 2}


def test_fit_keeps_aspect_and_never_upscales():
    assert fit(3024, 4032, 1024, 1024) == (768, 1024)
    assert fit(100, 50, 1024, 1024) == (100, 50)
    assert fit(65535, 1, 1024, 1024) == (1024, 1)


def test_resize_result_shape_and_webp_default(tmp_path):
    data = image_bytes("JPEG", (3000, 2000), quality=90)
    result, path = run(tmp_path, data, name="photo.jpg")
    assert set(result) >= {"success", "processingTime", "originalFile", "processedFile", "optimization"}
    assert result["originalFile"] == {"name": "photo.jpg", "size": len(data), "format": "jpeg",
                                      "dimensions": {"width": 3000, "height": 2000}}
    pf = result["processedFile"]
    assert pf["filename"] == "processed_job1.webp" and pf["url"] == "/api/images/processed_job1.webp"
    assert pf["format"] == "webp" and pf["dimensions"] == {"width": 1024, "height": 683}
    assert pf["size"] == path.stat().st_size
    opt = result["optimization"]
    assert opt["wasResized"] and opt["formatChanged"]
    assert opt["sizeSaved"] == len(data) - pf["size"]
    assert opt["compressionRatio"] == f"{opt['sizeSaved'] / len(data) * 100:.1f}%"
    im = Image.open(path)
    assert im.format == "WEBP" and im.size == (1024, 683)


def test_request_box_is_capped_by_server_limits(tmp_path):
    data = image_bytes("PNG", (4000, 1000))
    result, _ = run(tmp_path, data, Limits(max_width=800, max_height=800), maxWidth=5000, maxHeight=300, format="png")
    assert result["processedFile"]["dimensions"] == {"width": 800, "height": 200}
    result, _ = run(tmp_path, data, maxWidth=400, format="png")
    assert result["processedFile"]["dimensions"] == {"width": 400, "height": 100}


def test_cmyk_jpeg_becomes_srgb(tmp_path):
    data = image_bytes("JPEG", (32, 32), mode="CMYK", color=(0, 255, 255, 0), quality=95)
    _, path = run(tmp_path, data, format="png")
    out = Image.open(path)
    assert out.mode == "RGB"
    r, g, b = color_at(out, 16, 16)
    assert r > 200 and g < 80 and b < 80


def test_icc_profile_is_applied_and_not_carried(tmp_path):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = image_bytes("JPEG", (40, 40), color=(10, 120, 240), icc_profile=icc, quality=95)
    _, path = run(tmp_path, data, format="jpeg")
    out = Image.open(path)
    assert "icc_profile" not in out.info
    assert close(color_at(out, 20, 20), (10, 120, 240), tol=12)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA")])
def test_a_profile_other_than_srgb_is_applied_every_time(tmp_path, fmt, mode):
    """A profile whose colours differ from sRGB's is applied (here red and
    green swapped), also the second time it is seen (its transform is cached
    by the profile's digest), with and without an alpha channel."""
    for attempt in range(2):
        data = image_bytes(fmt, (40, 40), mode=mode, color=(255, 0, 0, 255)[:len(mode)], icc_profile=swapped_icc())
        _, path = run(tmp_path, data, name=f"in{attempt}", format="png")
        r, g, b = color_at(Image.open(path), 20, 20)
        assert g > 200 and r < 60, (attempt, (r, g, b))


def test_an_srgb_profile_under_any_name_is_not_applied():
    """A profile that maps a 17-level colour grid to within one level of
    itself is sRGB in effect: no transform (it cost 12 ms per megapixel)."""
    from PIL import ImageCms
    from imgworker import imaging

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert imaging._srgb_transform(srgb, "RGB") is None
    assert imaging._srgb_transform(srgb, "RGBA") is None
    assert imaging._srgb_transform(swapped_icc(), "RGB") is not None
    assert imaging._srgb_transform(b"not a profile", "RGB") is None  # broken: the picture as stored


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_profile_that_leaves_srgb_between_grid_levels_is_applied(tmp_path, mode):
    """A profile whose red curve is sRGB's at every 16th level but 12 levels
    darker between them is not sRGB: it is applied, and a stored red of 200
    comes out as the 188 it displays as (the check covers every level of
    each channel, not only the 17-level grid). sRGB's own curve as a
    256-entry table is still sRGB."""
    from imgworker import imaging

    srgb = table_curve([srgb_curve(level) for level in range(256)])
    assert imaging._srgb_transform(matrix_icc(SRGB_COLORANTS, (srgb,) * 3), mode) is None
    darker = table_curve([srgb_curve(level if level % 16 == 0 or level == 255 else level - 12)
                          for level in range(256)])
    icc = matrix_icc(SRGB_COLORANTS, (darker, srgb, srgb))
    assert imaging._srgb_transform(icc, mode) is not None
    data = image_bytes("PNG", (40, 40), mode=mode, color=(200, 100, 100, 255)[:len(mode)], icc_profile=icc)
    _, path = run(tmp_path, data, format="png")
    assert close(color_at(Image.open(path), 20, 20), (188, 100, 100), 1)


def test_a_profile_with_a_lookup_table_is_always_applied():
    """An A2B0 table is what lcms uses when a profile has one, and a table
    can leave sRGB anywhere between the colours checked: never skipped."""
    from imgworker import imaging

    srgb = table_curve([srgb_curve(level) for level in range(256)])
    icc = matrix_icc(SRGB_COLORANTS, (srgb,) * 3)
    assert not imaging._has_lookup_table(icc)
    for table in (b"A2B0", b"A2B1", b"D2B0"):
        renamed = icc[:132 + 12] + table + icc[132 + 16:]  # the second tag's signature (wtpt), renamed
        assert imaging._has_lookup_table(renamed)


def test_jpeg_output_is_progressive_and_alpha_flattened_on_white(tmp_path):
    im = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 25, 50))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    _, path = run(tmp_path, buf.getvalue(), format="jpeg")
    out = Image.open(path)
    assert out.format == "JPEG" and out.info.get("progressive") in (1, True)
    assert close(color_at(out, 40, 25), (255, 255, 255), tol=10)
    assert close(color_at(out, 10, 25), (255, 0, 0), tol=30)


def test_transparency_palette_and_16bit_handled(tmp_path):
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    _, path = run(tmp_path, buf.getvalue(), format="png")
    assert Image.open(path).convert("RGBA").getpixel((5, 5))[3] == 0
    row = struct.pack("<15H", *[40000] * 15) + struct.pack("<15H", *[0] * 15)
    deep = Image.frombytes("I;16", (30, 30), row * 30)
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    _, path = run(tmp_path, buf.getvalue(), format="png")
    out = Image.open(path).convert("L")
    assert 140 <= out.getpixel((5, 5)) <= 170 and out.getpixel((25, 5)) == 0


def test_animated_gif_keeps_frames_and_durations_in_webp(tmp_path):
    frames = [Image.new("RGB", (40, 30), (i * 50, 0, 255 - i * 50)) for i in range(5)]
    durations = [100, 200, 300, 400, 500]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    result, path = run(tmp_path, buf.getvalue())
    assert result["animated"] and result["framesIn"] == 5 and result["framesOut"] == 5
    out = Image.open(path)
    assert out.format == "WEBP" and out.n_frames == 5
    got = []
    for i in range(5):
        out.seek(i)
        out.load()
        got.append(out.info["duration"])
    assert got == durations
    # JPEG cannot animate: the first frame only
    result, path = run(tmp_path, buf.getvalue(), format="jpeg")
    assert not result["animated"] and result["framesOut"] == 1


def test_metadata_and_gps_are_stripped(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    assert b"CameraMaker" in buf.getvalue()
    for fmt in ("webp", "jpeg", "png", "original"):
        _, path = run(tmp_path, buf.getvalue(), format=fmt)
        raw = path.read_bytes()
        assert b"CameraMaker" not in raw and b"Exif" not in raw, fmt
        assert not Image.open(path).getexif().get_ifd(0x8825)


def test_never_worse_keeps_stripped_original(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(buf, "JPEG", quality=30, exif=exif.tobytes())
    data = buf.getvalue() + b"PK\x03\x04 trailing payload"
    result, path = run(tmp_path, data, format="original", quality=100)
    assert result["optimization"]["keptOriginalEncoding"] is True
    out = path.read_bytes()
    assert len(out) < len(data) and b"CameraMaker" not in out and b"payload" not in out
    assert ImageChops.difference(Image.open(path).convert("RGB"), Image.open(io.BytesIO(data)).convert("RGB")).getbbox() is None


def _png_with_size(width, height):
    good = image_bytes("PNG", (16, 16))
    ihdr = struct.pack(">II", width, height) + good[24:29]
    chunk = b"IHDR" + ihdr
    return good[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + good[33:]


def test_header_bomb_refused_before_decoding(tmp_path):
    src = tmp_path / "bomb.png"
    src.write_bytes(_png_with_size(30000, 30000))
    with pytest.raises(ImageError) as err:
        probe(src, LIMITS)
    assert err.value.code == "IMAGE_TOO_LARGE" and not err.value.transient
    src.write_bytes(_png_with_size(8000, 8000))  # under Pillow's own limit, over ours
    with pytest.raises(ImageError, match="64,000,000"):
        probe(src, LIMITS)


def test_frame_budget_refuses_frame_bombs(tmp_path):
    frames = [Image.new("L", (100, 100), i) for i in range(30)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    src = tmp_path / "anim.gif"
    src.write_bytes(buf.getvalue())
    with pytest.raises(ImageError) as err:
        probe(src, Limits(max_animation_pixels=100 * 100 * 29))
    assert err.value.code == "IMAGE_TOO_LARGE"
    # longer than MAX_FRAMES but within the budget: kept as a still; frames
    # are counted only up to MAX_FRAMES + 1 (a frame bomb is not walked)
    result, _ = run(tmp_path, buf.getvalue(), Limits(max_frames=10))
    assert result["framesIn"] == 11 and result["framesOut"] == 1 and not result["animated"]


@pytest.mark.parametrize("data, code", [
    (b"", "INVALID_IMAGE"),
    (b"x", "UNSUPPORTED_FORMAT"),
    (b"<?php echo 1; ?>", "UNSUPPORTED_FORMAT"),
    (image_bytes("BMP"), "UNSUPPORTED_FORMAT"),
    (image_bytes("TIFF"), "UNSUPPORTED_FORMAT"),
    (image_bytes("JPEG", (300, 300))[:600], "INVALID_IMAGE"),
    (image_bytes("PNG", (300, 300))[:200], "INVALID_IMAGE"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "INVALID_IMAGE"),
])
def test_bad_inputs_get_deterministic_codes(tmp_path, data, code):
    with pytest.raises(ImageError) as err:
        run(tmp_path, data)
    assert err.value.code == code and not err.value.transient
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind


def test_disallowed_format_is_unsupported(tmp_path):
    with pytest.raises(ImageError) as err:
        run(tmp_path, image_bytes("GIF"), Limits(formats=("jpeg", "png")))
    assert err.value.code == "UNSUPPORTED_FORMAT"


def test_missing_input_is_transient_io_error(tmp_path):
    with pytest.raises(ImageError) as err:
        process(tmp_path / "gone", tmp_path, "j", {}, LIMITS)
    assert err.value.code == "IO_ERROR" and err.value.transient


def test_sniff():
    assert sniff(image_bytes("WEBP")) == "webp" and sniff(image_bytes("GIF")) == "gif"
    assert sniff(b"BM....") == "bmp" and sniff(b"hello") is None


def test_corrupt_zlib_stream_is_refused_not_half_decoded(tmp_path):
    """Regression: PNG's getexif() loads the image; catching that failure let a
    second load() 'succeed' with a partial picture (corpus broken_data_stream.png)."""
    good = image_bytes("PNG", (120, 80), color=(10, 200, 30))
    pos = good.index(b"IDAT")
    length = struct.unpack(">I", good[pos - 4:pos])[0]
    data = bytearray(good[pos + 4:pos + 4 + length])
    data[2:12] = b"\xff" * 10  # garbage in the deflate stream, CRC kept valid
    chunk = b"IDAT" + bytes(data)
    bad = good[:pos - 4] + struct.pack(">I", length) + chunk + struct.pack(">I", zlib.crc32(chunk)) + good[pos + 8 + length:]
    with pytest.raises(ImageError) as err:
        run(tmp_path, bad)
    assert err.value.code == "INVALID_IMAGE" and not err.value.transient


def test_exact_box_width_for_odd_aspect_ratios(tmp_path):
    """Regression: Image.thumbnail() rounded 1502x900 to 1023 wide; the box is filled exactly."""
    result, path = run(tmp_path, image_bytes("PNG", (1502, 900)), format="png")
    assert result["processedFile"]["dimensions"] == {"width": 1024, "height": 614}
    assert Image.open(path).size == (1024, 614)


def _photo_like(size, seed=7):
    """Detailed RGB content (noise over gradients), so resampling differences show."""
    import random

    rnd = random.Random(seed)
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    noise = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    return Image.blend(im, noise, 0.5)


def test_real_transparency_composites_on_white_for_jpeg_without_dark_fringes(tmp_path):
    """Opaque grey beside fully transparent *black*, and a half-transparent grey
    band: resizing must weigh colours by alpha, or the black bleeds into the
    edge (a dark fringe), and the JPEG must show white where nothing was."""
    im = Image.new("RGBA", (2000, 1000), (0, 0, 0, 0))
    im.paste((100, 100, 100, 255), (0, 0, 1001, 1000))
    im.paste((100, 100, 100, 128), (1300, 0, 1500, 1000))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    result, path = run(tmp_path, buf.getvalue(), format="jpeg", quality=95)
    out = Image.open(path).convert("L")
    assert out.size == (1024, 512) and result["processedFile"]["dimensions"] == {"width": 1024, "height": 512}
    row = [out.getpixel((x, 256)) for x in range(1024)]
    assert min(row) >= 92  # grey over white never darker than the grey (black bled in would be)
    assert abs(row[100] - 100) <= 4 and row[900] >= 250
    assert abs(row[round(1400 * 1024 / 2000)] - 178) <= 5  # half-transparent grey on white


@pytest.mark.parametrize("size,orientation,box,scale", [
    ((4100, 1030), 1, {}, 2), ((4201, 2799), 1, {}, 2), ((2049, 4097), 1, {"maxWidth": 300}, 2),
    ((1999, 3001), 6, {"maxWidth": 500, "maxHeight": 333}, 2), ((4096, 2304), 8, {"maxWidth": 511}, 2),
    ((3840, 2160), 1, {}, 1), ((5640, 3172), 6, {}, 2), ((2000, 1200), 1, {}, 1), ((8192, 4608), 1, {}, 4),
])
def test_jpeg_drafted_for_a_box_has_exactly_the_fitted_size_and_the_right_pixels(tmp_path, monkeypatch, size,
                                                                                 orientation, box, scale):
    """libjpeg decodes at the smallest scale 1/n that still covers twice the
    fitted size (a 3840 px photo whole for a 1024 box, where sharp takes 1/2
    and loses detail; a 5640 px one at 1/2, an 8192 px one at 1/4); the
    output has exactly the fitted size and shows the same picture as a full
    decode would."""
    from PIL import JpegImagePlugin

    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        out = real_load(self)
        decoded.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = io.BytesIO()
    upright = _photo_like((size[0] // 16, size[1] // 16)).resize(size if orientation < 5 else size[::-1])
    STORED[orientation](upright).save(data, "JPEG", quality=90, exif=exif)
    want = fit(*upright.size, min(box.get("maxWidth", 1024), 1024), min(box.get("maxHeight", 1024), 1024))
    result, path = run(tmp_path, data.getvalue(), format="png", **box)
    out = Image.open(path).convert("RGB")
    assert out.size == want
    assert result["processedFile"]["dimensions"] == {"width": want[0], "height": want[1]}
    stored_want = want if orientation < 5 else want[::-1]
    assert decoded[0] == (-(-size[0] // scale), -(-size[1] // scale))  # decoded at 1/scale...
    need = [round(n * imaging._DRAFT_GAP) for n in stored_want]
    assert scale == 1 or decoded[0][0] >= need[0] and decoded[0][1] >= need[1]  # covering twice the fitted size
    assert scale == 8 or not (size[0] // (2 * scale) >= need[0] and size[1] // (2 * scale) >= need[1])  # the smallest
    reference = upright.resize(want, Image.Resampling.LANCZOS)

    def mean_diff(a, b):
        hist = ImageChops.difference(a, b).convert("L").histogram()
        return sum(i * n for i, n in enumerate(hist)) / (a.size[0] * a.size[1])

    shifted = reference.transform(want, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 1))
    assert mean_diff(out, reference) < mean_diff(shifted, reference) / 2  # the same picture, not shifted or torn


def test_lossless_jpeg_is_decoded_at_full_size(tmp_path):
    """A lossless (SOF3) JPEG has no DCT to scale: libjpeg refuses a scale for
    it, so it is decoded whole and then resized, never failed as corrupt."""
    from lossless_jpeg import lossless_jpeg

    def pixel(x, y):
        return (255, 0, 0) if x < 150 else (0, 0, 255)

    data = lossless_jpeg(300, 40, pixel, ncomp=3)
    result, path = run(tmp_path, data, format="png", maxWidth=100)
    out = Image.open(path).convert("RGB")
    assert out.size == (100, 13) and result["originalFile"]["format"] == "jpeg"
    assert close(out.getpixel((10, 6)), (255, 0, 0), 8) and close(out.getpixel((90, 6)), (0, 0, 255), 8)


def test_opaque_alpha_png_and_its_rgb_twin_give_the_same_pixels(tmp_path):
    rgb = _photo_like((1300, 700))
    rgba = rgb.copy()
    rgba.putalpha(255)
    outs = []
    for name, im in (("rgb.png", rgb), ("rgba.png", rgba)):
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=1)
        _, path = run(tmp_path, buf.getvalue(), name=name, format="png")
        outs.append(Image.open(path))
        outs[-1].load()
    assert outs[0].size == outs[1].size == (1024, 551)
    assert outs[1].mode == "RGB"  # the all-opaque alpha is not carried into the output
    assert ImageChops.difference(outs[0], outs[1]).getbbox() is None


def test_never_larger_keeps_the_stripped_original_gif(tmp_path):
    """The never-larger rule covers GIF: an animation stored as small frame
    deltas (which our re-encoding, full frames, would make larger) comes back
    as the original frames, timings and loop count, with its comment and
    application metadata (here XMP) dropped and trailing bytes cut."""
    base = Image.effect_noise((160, 120), 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).convert("RGB")
    frames = []
    for i in range(4):
        frame = base.copy()
        frame.paste((255, 0, 0), (10 + 20 * i, 50, 20 + 20 * i, 60))  # a small square moves
        frames.append(frame)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=[40, 60, 80, 100], loop=3,
                   comment=b"secret comment")
    data = buf.getvalue()
    xmp = b"\x21\xff\x0bXMP DataXMP" + b"\x0esecret-xmp-gps" + b"\x00"
    data = data[:-1] + xmp + b"\x3b" + b"trailing payload"
    result, path = run(tmp_path, data, format="original")
    assert result["optimization"]["keptOriginalEncoding"] is True and result["framesOut"] == 4
    out = path.read_bytes()
    assert len(out) < len(data) and b"secret" not in out and b"payload" not in out and out.endswith(b"\x3b")
    got, want = Image.open(path), Image.open(io.BytesIO(data))
    assert got.info.get("loop") == 3 and got.n_frames == 4
    for i in range(4):
        got.seek(i)
        want.seek(i)
        assert got.info["duration"] == want.info["duration"] == [40, 60, 80, 100][i]
        assert ImageChops.difference(got.convert("RGB"), want.convert("RGB")).getbbox() is None


def test_the_fast_resizer_is_in_use_and_agrees_with_pillow():
    """fast_image_resize is installed and passed its check against Pillow: a
    broken install would silently cost 25-45 % of every job's CPU."""
    from imgworker import imaging

    assert imaging._fast_resizer() is not None, "cykooz.resizer missing: run `bash .ci/venv test`"
    src = _photo_like((640, 400))
    assert imaging._max_difference(imaging._resize(src, (192, 120)),
                                   src.resize((192, 120), Image.Resampling.LANCZOS)) <= 2


def test_a_resizer_that_disagrees_with_pillow_is_not_used(tmp_path, monkeypatch):
    """The fast resizer reads Pillow's memory directly: if it returns
    anything but Pillow's picture (a layout it does not know), the worker
    resizes with Pillow instead, and the job's output is still right."""
    from imgworker import imaging

    class Scrambling:
        def resize_pil(self, src, dst, options):
            dst.paste(src.crop((0, 0) + dst.size).transpose(Image.Transpose.ROTATE_180))

    monkeypatch.setattr(imaging, "_FastResizer", Scrambling)
    monkeypatch.setattr(imaging, "_fast", [])
    assert imaging._fast_resizer() is None
    buf = io.BytesIO()
    quadrants((400, 200)).save(buf, "PNG")
    _, path = run(tmp_path, buf.getvalue(), format="png", maxWidth=100)
    out = Image.open(path)
    assert out.size == (100, 50)
    assert close(color_at(out, 10, 10), (255, 0, 0), 2) and close(color_at(out, 90, 40), (255, 255, 255), 2)


_RESIZE_UNDER_A_CAP = r"""
import resource, sys
from PIL import Image
from imgworker import imaging

assert imaging._fast_resizer() is not None
mode, owned = sys.argv[1].split()[0], sys.argv[1].endswith(" owned")
src = Image.new(mode, (6000, 4000), 90)
src.load()
with open("/proc/self/statm") as fh:
    used = int(fh.read().split()[0]) * resource.getpagesize()
cap = used + int(sys.argv[2]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
pillow = Image.Image.resize
Image.Image.resize = lambda *a, **k: print("pillow", flush=True) or pillow(*a, **k)
try:
    print(imaging._resize(src, (3000, 2000), owned).size, flush=True)
except MemoryError:
    print("MemoryError", flush=True)
"""


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBA owned"])
def test_the_fast_resizer_never_aborts_a_worker_at_its_memory_cap(mode):
    """A worker's address space is capped (WORKER_MAX_RSS_MB x 2). Rust
    aborts the whole process when an allocation fails, so near the cap the
    fast resizer must not run: Pillow's resize raises MemoryError (the job
    fails as IMAGE_TOO_LARGE, the worker lives). Far from the cap it runs.
    An RGBA frame the caller owns is premultiplied where it lies; one it
    does not own needs a 92 MB copy first, which the check must count."""
    import subprocess
    import sys

    def resize_with(headroom_mb):
        return subprocess.run([sys.executable, "-c", _RESIZE_UNDER_A_CAP, mode, str(headroom_mb)],
                              capture_output=True, text=True, timeout=60)

    # room for the 3000x2000 output (23 MB), not for the fast path's buffers (46 MB and more)
    tight = resize_with(40)
    assert tight.returncode == 0, tight.stderr[-500:]
    assert tight.stdout.split("\n")[:2] == ["pillow", "MemoryError"]
    # room for the output and the fast path's intermediate (46 MB), not for a copy of the input
    middle = resize_with(110)
    assert middle.returncode == 0, middle.stderr[-500:]
    if mode == "RGBA":
        assert middle.stdout.split("\n")[0] == "pillow", middle.stdout
    else:
        assert middle.stdout.strip() == "(3000, 2000)", middle.stdout
    roomy = resize_with(600)
    assert roomy.returncode == 0 and roomy.stdout.strip() == "(3000, 2000)", roomy.stdout + roomy.stderr[-500:]


_ENCODE_UNDER_A_CAP = r"""
import resource, sys
from imgworker import imaging
from imgworker import imaging
from imgworker.errors import ImageError
from imgworker.limits import Limits

real_encode, headroom = imaging._encode, [0]
UNCAPPED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def capped_encode(*args, **kwargs):
    # the cap falls just before encoding (decoding is not what is tested) and
    # stays while a failure is handled, as a worker's does
    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom[0] * 2**20, resource.RLIM_INFINITY))
    data = real_encode(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_AS, UNCAPPED)
    return data


imaging._encode = capped_encode
for headroom[0] in range(5, 125, 10):
    resource.setrlimit(resource.RLIMIT_AS, UNCAPPED)
    try:
        imaging.process(sys.argv[1], sys.argv[2], "j", {"format": sys.argv[3]}, Limits(max_width=4096, max_height=4096))
        print("ok", flush=True)
    except ImageError as exc:
        print(exc.code, flush=True)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
"""


@pytest.mark.parametrize("fmt", ["webp", "gif", "jpeg"])
def test_an_encoder_out_of_memory_is_image_too_large_not_a_server_error(tmp_path, fmt):
    """Near the worker's memory cap the codecs fail in their own words
    (libwebp "encoding error 1", the GIF quantizer "quantization error",
    libjpeg "broken data stream"): the job fails as IMAGE_TOO_LARGE, like a
    MemoryError, not as a server error. Encoded under caps from 5 to 115 MB
    above what the process holds: each attempt works or is IMAGE_TOO_LARGE."""
    import subprocess
    import sys

    gradient = Image.linear_gradient("L").resize((3000, 2000))
    Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                        gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM))).save(tmp_path / "in.png")
    (tmp_path / "out").mkdir()
    run_ = subprocess.run([sys.executable, "-c", _ENCODE_UNDER_A_CAP, str(tmp_path / "in.png"), str(tmp_path / "out"),
                           fmt], capture_output=True, text=True, timeout=120)
    outcomes = run_.stdout.split()
    assert run_.returncode == 0 and len(outcomes) == 12, run_.stdout + run_.stderr[-500:]
    assert set(outcomes) == {"ok", "IMAGE_TOO_LARGE"}, run_.stdout


def test_keeping_the_original_out_of_memory_still_gives_the_re_encoded_picture(tmp_path, monkeypatch):
    """Stripping the original's metadata is an optimisation: when it runs
    out of memory, the job still succeeds with the picture it encoded."""
    from imgworker import imaging

    def no_memory(data, fmt):
        raise MemoryError

    monkeypatch.setattr(imaging, "strip", no_memory)
    result, path = run(tmp_path, image_bytes("PNG", (40, 30)), format="png")
    assert result["optimization"]["keptOriginalEncoding"] is False
    assert Image.open(path).size == (40, 30)


def test_an_animation_frame_resized_with_alpha_leaves_the_next_frame_intact(tmp_path):
    """An APNG frame stores only what changed: the decoder draws it over the
    previous frame's pixels. Resizing premultiplies alpha, which must not
    happen in those pixels (the next frame would show the half-transparent
    red darkened to (128, 0, 0))."""
    from PIL import PngImagePlugin

    first = Image.new("RGBA", (1200, 200), (0, 0, 255, 255))
    first.paste((255, 0, 0, 128), (0, 0, 600, 200))
    second = first.copy()
    second.paste((0, 255, 0, 255), (1000, 50, 1100, 150))  # the only change: a green square
    buf = io.BytesIO()
    first.save(buf, "PNG", save_all=True, append_images=[second], duration=[100, 100], loop=0,
               disposal=PngImagePlugin.Disposal.OP_NONE, blend=PngImagePlugin.Blend.OP_SOURCE)
    with Image.open(io.BytesIO(buf.getvalue())) as check:
        check.seek(1)
        assert check.tile[0][1][2] - check.tile[0][1][0] < 200, "the second frame should be stored as a delta"
    result, path = run(tmp_path, buf.getvalue(), format="webp", quality=100, maxWidth=600)
    assert result["framesOut"] == 2
    out = Image.open(path)
    for index in range(2):
        out.seek(index)
        frame = out.convert("RGBA")
        assert frame.size == (600, 100)
        red = frame.getpixel((100, 50))
        assert close(red[:3], (255, 0, 0), 12) and abs(red[3] - 128) <= 4, (index, red)
        assert close(frame.getpixel((400, 50)), (0, 0, 255, 255), 12)
    assert close(frame.getpixel((525, 50)), (0, 255, 0, 255), 12)  # the second frame's square


def test_rgba_resize_premultiplies_in_place_only_in_a_frame_it_owns():
    """The fast RGBA path multiplies alpha in the source's own pixels when
    the caller owns them, else in a copy; either way the result is exactly
    what fast_image_resize's own premultiplying resize gives (alpha-weighted:
    the transparent black here must not darken the colours beside it). A
    frame that is not owned, or a read-only one (pixels in someone else's
    buffer), is left as it was."""
    from imgworker import imaging

    resizer = imaging._fast_resizer()
    assert resizer is not None
    src = _photo_like((900, 500))
    alpha = Image.linear_gradient("L").resize((900, 500))
    alpha.paste(0, (0, 0, 300, 500))  # fully transparent...
    src.putalpha(alpha)
    src.paste((0, 0, 0, 0), (0, 0, 300, 500))  # ...and black
    before = src.tobytes()
    want = Image.new("RGBA", (300, 167))
    resizer().resize_pil(src, want, imaging._FAST_OPTIONS)  # premultiplies into a copy of its own

    not_owned = imaging._resize(src, (300, 167))
    assert src.mode == "RGBA" and src.tobytes() == before
    buffer = bytearray(before)
    read_only = Image.frombuffer("RGBA", src.size, buffer, "raw", "RGBA", 0, 1)
    assert read_only.readonly
    from_read_only = imaging._resize(read_only, (300, 167), owned=True)
    assert bytes(buffer) == before
    owned = imaging._resize(src, (300, 167), owned=True)
    for out in (not_owned, from_read_only, owned):
        assert out.mode == "RGBA" and out.size == (300, 167)
        assert ImageChops.difference(out, want).getbbox() is None
    assert owned.getpixel((150, 80))[3] > 0 and owned.getpixel((50, 80))[3] == 0


@pytest.mark.parametrize("width, released", [(320, True), (None, False)])
def test_a_stills_full_size_pixels_go_before_encoding(tmp_path, monkeypatch, photo_png, width, released):
    """A still's decoded picture (35 MB for a 3640x2400 RGBA PNG) is released
    as soon as the resized frame exists, so the encoder's buffers do not come
    on top of it (peak RSS of that PNG to WebP: 86.6 -> 74.3 MiB). Not when
    the frame is the decoded picture itself (nothing to resize)."""
    from imgworker import imaging

    loaded, states = [], []
    real_load, real_encode = imaging._load_still, imaging._encode
    monkeypatch.setattr(imaging, "_load_still", lambda im: loaded.append(real_load(im)) or loaded[-1])

    def encode(*args, **kwargs):
        try:
            loaded[0].getpixel((0, 0))
            states.append(False)
        except ValueError:  # "Operation on closed image"
            states.append(True)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(imaging, "_encode", encode)
    result, path = run(tmp_path, photo_png("RGB", size=(640, 400)), format="webp", maxWidth=width)
    assert states == [released]
    assert Image.open(path).size == ((320, 200) if width else (640, 400))
