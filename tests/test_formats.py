"""Modern formats: AVIF out and in, HEIC in (pillow-heif), format=auto, and
HEIF/AVIF header bombs refused before any pixel is decoded. Fixtures are
generated here: Pillow writes AVIF, pillow-heif writes HEIC; hostile headers
are built box by box."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from imgworker import config, formats, imaging, isobmff
from imgworker.errors import ImageError
from imgworker.views import result_view

from helpers import image_bytes, swapped_icc

pytestmark = pytest.mark.skipif(not formats.HAS_AVIF, reason="this Pillow has no AVIF codec")
needs_heif = pytest.mark.skipif(not formats.HAS_HEIF, reason="pillow-heif (imgworker[heif]) not installed")

ALL = imaging.Limits(formats=("jpeg", "png", "webp", "gif", "avif", "heic") if formats.HAS_HEIF
                     else ("jpeg", "png", "webp", "gif", "avif"))


def quadrants(size=(200, 100), mode="RGB"):
    """Red picture with a blue top-left quadrant: shows any turn or flip."""
    im = Image.new(mode, size, (220, 20, 20) + ((255,) if mode == "RGBA" else ()))
    im.paste((20, 20, 220) + ((255,) if mode == "RGBA" else ()), (0, 0, size[0] // 2, size[1] // 2))
    return im


def encode(im, fmt, **save):
    if fmt == "HEIF":
        imaging._register_heif()  # pillow-heif's plugin (imaging registers it at the first HEIC job)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def run(tmp_path, data, name="in", limits=ALL, **options):
    src = tmp_path / name
    src.write_bytes(data)
    result = result_view("job", name, imaging.process(src, tmp_path, "job", options, limits))
    out = Image.open(tmp_path / result["processedFile"]["filename"])
    return result, out


def blue_corner(im):
    """Which corner holds the blue quadrant (tl, tr, bl, br)."""
    rgb = im.convert("RGB")
    w, h = rgb.size
    corners = {"tl": (w // 8, h // 8), "tr": (w - 1 - w // 8, h // 8), "bl": (w // 8, h - 1 - h // 8),
               "br": (w - 1 - w // 8, h - 1 - h // 8)}
    return [k for k, xy in corners.items() if rgb.getpixel(xy)[2] > 150 and rgb.getpixel(xy)[0] < 100]


def exif(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    ex[0x010F] = "SecretCam"
    return ex.tobytes()


# --- AVIF out -----------------------------------------------------------------------------

def test_avif_output_fits_the_box_and_is_an_avif(tmp_path):
    result, out = run(tmp_path, image_bytes("JPEG", (3000, 1500)), format="avif")
    assert out.format == "AVIF" and out.size == (1024, 512)
    assert result["processedFile"]["format"] == "avif" and result["processedFile"]["filename"].endswith(".avif")
    assert result["processedFile"]["dimensions"] == {"width": 1024, "height": 512}
    _, small = run(tmp_path, image_bytes("PNG", (40, 30)), format="avif", maxWidth=20)
    assert small.size == (20, 15)


@pytest.mark.parametrize("orientation, corner", [(1, "tl"), (3, "br"), (6, "tr"), (8, "bl")])
def test_avif_output_is_upright_from_exif_orientation(tmp_path, orientation, corner):
    # stored picture 200x100; orientations 6/8 display it 100x200
    data = encode(quadrants(), "JPEG", quality=95, exif=exif(orientation))
    _, out = run(tmp_path, data, format="avif")
    assert out.size == ((100, 200) if orientation in (6, 8) else (200, 100))
    assert blue_corner(out) == [corner]
    assert not out.getexif() and "icc_profile" not in out.info  # upright pixels, no metadata, no irot


def test_avif_output_keeps_alpha(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 200, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 32, 64))
    _, out = run(tmp_path, encode(im, "PNG"), format="avif")
    assert out.mode == "RGBA"
    assert out.getpixel((8, 32))[3] < 10 and out.getpixel((56, 32))[3] > 245


def test_avif_quality_mapping_and_speed_setting(tmp_path):
    assert formats.avif_quality(80) == 66 and formats.avif_quality(100) == 100 and formats.avif_quality(1) == 1
    assert all(formats.avif_quality(q) <= formats.avif_quality(q + 1) for q in range(1, 100))
    photo = Image.radial_gradient("L").resize((512, 512)).convert("RGB")
    photo = Image.merge("RGB", (photo.getchannel(0), photo.rotate(90).getchannel(0), Image.effect_noise((512, 512), 40)))
    data = encode(photo, "PNG")
    sizes = {q: run(tmp_path, data, format="avif", quality=q)[0]["processedFile"]["size"] for q in (30, 90)}
    assert sizes[30] < sizes[90]  # the quality option reaches the encoder
    fast = run(tmp_path, data, limits=imaging.Limits(avif_speed=10), format="avif")[0]["processedFile"]["size"]
    slow = run(tmp_path, data, limits=imaging.Limits(avif_speed=4), format="avif")[0]["processedFile"]["size"]
    assert fast != slow  # the speed setting reaches the encoder


def test_settings_take_avif_and_refuse_missing_decoders(monkeypatch):
    cfg = config.load({"OUTPUT_FORMAT": "avif", "AVIF_SPEED": "9", "SUPPORTED_FORMATS": "jpeg,avif"}, dotenv=None)
    assert cfg.output_format == "avif" and cfg.avif_speed == 9 and config.load({}, dotenv=None).avif_speed == 6 and cfg.supported_formats == ("jpeg", "avif")
    assert config.load({}, dotenv=None).supported_formats == ("jpeg", "png", "webp", "gif")  # SPEC §3 default
    monkeypatch.setattr(config, "FORMATS", formats.BASE_FORMATS + ("avif",))  # as without pillow-heif
    with pytest.raises(config.ConfigError, match=r"SUPPORTED_FORMATS.*pillow-heif"):
        config.load({"SUPPORTED_FORMATS": "jpeg,heic"}, dotenv=None)


# --- AVIF and HEIC in ---------------------------------------------------------------------

def test_avif_input_with_rotation_and_metadata(tmp_path):
    # Pillow turns EXIF orientation 6 into an irot box when writing AVIF
    data = encode(quadrants(), "AVIF", quality=90, exif=exif(6))
    assert b"irot" in data
    info = imaging.probe(_write(tmp_path, data), ALL)
    assert (info.format, info.width, info.height) == ("avif", 100, 200)
    result, out = run(tmp_path, data, format="jpeg")
    assert out.size == (100, 200) and blue_corner(out) == ["tr"]
    assert result["originalFile"]["format"] == "avif" and b"SecretCam" not in (tmp_path / result["processedFile"]["filename"]).read_bytes()


def test_avif_input_is_decoded_in_one_thread(tmp_path, monkeypatch):
    """The pool's workers are the parallelism: an AVIF upload is decoded in
    one thread (Pillow's default is one per core), as HEIC and AVIF output are."""
    from PIL import AvifImagePlugin

    real, threads = AvifImagePlugin._avif, []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def AvifDecoder(data, codec, max_threads):  # noqa: N802  (Pillow's name)
            threads.append(max_threads)
            return real.AvifDecoder(data, codec, max_threads)

    monkeypatch.setattr(AvifImagePlugin, "_avif", Spy())
    result, out = run(tmp_path, encode(quadrants((640, 480)), "AVIF", quality=90), format="jpeg")
    assert out.size == (640, 480) and threads and set(threads) == {1}


def _write(tmp_path, data, name="probe.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_avif_input_refused_unless_supported(tmp_path):
    data = encode(quadrants(), "AVIF")
    with pytest.raises(ImageError) as err:
        imaging.probe(_write(tmp_path, data), imaging.Limits())  # the SPEC's default list
    assert err.value.code == "UNSUPPORTED_FORMAT" and err.value.status == 415


def test_avif_with_alpha_in_and_original_keeps_avif(tmp_path):
    im = Image.new("RGBA", (50, 40), (0, 0, 255, 0))
    im.paste((255, 0, 0, 255), (25, 0, 50, 40))
    data = encode(im, "AVIF", quality=90)
    assert imaging.probe(_write(tmp_path, data), ALL).alpha
    result, out = run(tmp_path, data, format="original")
    assert out.format == "AVIF" and out.mode == "RGBA" and out.getpixel((5, 20))[3] < 10
    _, png = run(tmp_path, data, format="png")
    assert png.mode == "RGBA" and png.getpixel((5, 20))[3] < 10 and png.getpixel((45, 20))[3] > 245


def test_animated_avif_is_treated_like_animated_webp(tmp_path):
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=[100, 200, 300], quality=80)
    info = imaging.probe(_write(tmp_path, data), ALL)
    assert info.format == "avif" and info.frames == 3 and info.animated
    result, out = run(tmp_path, data, format="webp")
    assert result["animated"] and result["framesOut"] == 3 and out.n_frames == 3
    result, out = run(tmp_path, data, format="avif")
    assert result["animated"] and out.n_frames == 3
    result, out = run(tmp_path, data, format="jpeg")
    assert not result["animated"] and result["framesOut"] == 1
    with pytest.raises(ImageError) as err:  # frames x canvas budget, from the header
        imaging.probe(_write(tmp_path, data), imaging.Limits(formats=("avif",), max_animation_pixels=64 * 48 * 2))
    assert err.value.code == "IMAGE_TOO_LARGE"


@needs_heif
def test_heic_input_turned_stripped_and_written_as_jpeg_for_original(tmp_path):
    data = encode(quadrants((400, 200)), "HEIF", quality=90, exif=exif(6))
    assert data[4:12] == b"ftypheic"
    info = imaging.probe(_write(tmp_path, data), ALL)
    assert (info.format, info.width, info.height) == ("heic", 200, 400)
    result, out = run(tmp_path, data, format="original")
    assert out.format == "JPEG" and result["processedFile"]["format"] == "jpeg"  # browsers do not show HEIC
    assert out.size == (200, 400) and blue_corner(out) == ["tr"]
    assert not out.getexif() and b"SecretCam" not in (tmp_path / result["processedFile"]["filename"]).read_bytes()
    _, webp = run(tmp_path, data, format="webp")
    assert webp.size == (200, 400) and blue_corner(webp) == ["tr"]


@needs_heif
def test_heic_ten_bit_and_alpha_come_out_as_8_bit(tmp_path):
    import pillow_heif

    im = quadrants((64, 64), "RGBA")
    im.putpixel((60, 60), (0, 0, 0, 0))
    heif = pillow_heif.from_pillow(im)
    buf = io.BytesIO()
    heif.save(buf, quality=95)
    ten = pillow_heif.from_bytes(mode="RGB;16", size=(64, 64), data=bytes(64 * 64 * 6))
    tbuf = io.BytesIO()
    ten.save(tbuf, quality=90)
    assert imaging.probe(_write(tmp_path, buf.getvalue()), ALL).alpha
    _, out = run(tmp_path, buf.getvalue(), format="png")
    assert out.mode == "RGBA" and blue_corner(out) == ["tl"]
    result, out = run(tmp_path, tbuf.getvalue(), format="png")
    assert out.mode == "RGB" and result["originalFile"]["format"] == "heic"


@needs_heif
def test_heic_grid_like_a_phone_photo_and_its_canvas_bomb(tmp_path, monkeypatch):
    import pillow_heif

    # Phones store big photos as a grid of HEVC tiles; libheif writes one too.
    monkeypatch.setattr(pillow_heif.options, "GRID_TILE_SIZE", 256)
    im = quadrants((1000, 700))
    data = encode(im, "HEIF", quality=60)
    header = isobmff.inspect(io.BytesIO(data), 50_000_000, 500_000_000)
    assert header.items == 13 and (header.width, header.height) == (1000, 700)  # 4x3 tiles + the grid
    result, out = run(tmp_path, data, format="webp", maxWidth=500)
    assert out.size == (500, 350) and blue_corner(out) == ["tl"] and result["originalFile"]["format"] == "heic"
    at = data.index(b"idat") + 4 + 4  # grid descriptor: version, flags, rows-1, cols-1, width16, height16
    bomb_ = data[:at] + b"\xff\xff\xff\xff" + data[at + 4:]
    monkeypatch.setattr(imaging.Image, "open", lambda *a, **k: pytest.fail("a decoder was reached"))
    with pytest.raises(ImageError) as err:
        imaging.probe(_write(tmp_path, bomb_), ALL)
    assert err.value.code == "IMAGE_TOO_LARGE" and "grid" in err.value.message


@needs_heif
def test_heic_refused_when_not_listed(tmp_path):
    data = encode(quadrants(), "HEIF")
    with pytest.raises(ImageError) as err:
        imaging.probe(_write(tmp_path, data), imaging.Limits(formats=("jpeg", "avif")))
    assert err.value.code == "UNSUPPORTED_FORMAT"


@pytest.mark.parametrize("fmt", ["AVIF"] + (["HEIF"] if formats.HAS_HEIF else []))
def test_icc_profile_applied_and_metadata_dropped_for_avif_and_heic(tmp_path, fmt):
    data = encode(Image.new("RGB", (64, 64), (255, 0, 0)), fmt, quality=95, icc_profile=swapped_icc(),
                  exif=exif(1), xmp=b"<x:xmpmeta>SecretXMP</x:xmpmeta>")
    for out_fmt in ("webp", "avif", "jpeg"):
        result, out = run(tmp_path, data, format=out_fmt)
        r, g, b = out.convert("RGB").getpixel((32, 32))
        assert g > 200 and r < 60, (out_fmt, (r, g, b))  # stored red, displayed green: converted to sRGB
        raw = (tmp_path / result["processedFile"]["filename"]).read_bytes()
        assert b"SecretXMP" not in raw and b"SecretCam" not in raw and "icc_profile" not in out.info


def test_cli_writes_avif_locally(tmp_path):
    import subprocess
    import sys

    (tmp_path / "in.jpg").write_bytes(image_bytes("JPEG", (2000, 1000)))
    proc = subprocess.run([sys.executable, "-m", "imgworker", "process", "--local", "--format", "avif", "--out",
                           str(tmp_path / "out"), str(tmp_path / "in.jpg")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path / "d")})
    assert proc.returncode == 0, proc.stderr
    out = Image.open(tmp_path / "out" / "in.avif")
    assert out.format == "AVIF" and out.size == (1024, 512)


# --- format=auto --------------------------------------------------------------------------

@pytest.mark.parametrize("accept, alpha, animated, want", [
    ("image/avif,image/webp,image/apng,image/*,*/*;q=0.8", False, False, "avif"),  # Chrome
    ("image/webp,*/*", False, False, "webp"),
    ("image/avif;q=0,image/webp", False, False, "webp"),  # q=0 refuses
    ("IMAGE/AVIF ; q=0.5", False, False, "avif"),
    ("*/*", False, False, "jpeg"),  # a wildcard says nothing about the viewer
    ("image/*", True, False, "png"),
    ("", True, False, "png"),
    ("image/jpeg", False, False, "jpeg"),
    ("image/png,image/gif", False, True, "gif"),
    ("image/webp", False, True, "webp"),
    ("image/avif,image/webp", False, True, "webp"),  # animations: WebP first (cheaper per frame)
    ("image/avif", False, True, "avif"),
    ("," * 5000 + "image/avif", False, False, "jpeg"),  # only the first 64 entries are read
])
def test_negotiate(accept, alpha, animated, want):
    assert formats.negotiate(accept, alpha, animated) == want


@pytest.mark.parametrize("accept, image, want", [
    ("image/avif,image/webp,*/*", "JPEG", "avif"),
    ("image/webp,*/*;q=0.8", "JPEG", "webp"),
    ("*/*", "JPEG", "jpeg"),
    ("*/*", "PNGA", "png"),
    ("image/webp", "PNGA", "webp"),
])
def test_auto_is_chosen_at_upload_and_recorded_on_the_job(api_server, accept, image, want):
    http, api = api_server()
    data = image_bytes("PNG", (30, 20), "RGBA", (1, 2, 3, 100)) if image == "PNGA" else image_bytes("JPEG", (30, 20))
    r = http.upload(files=[("image", "x", data)], fields={"format": "auto"}, headers={"Accept": accept})
    assert r.status == 202, r.body
    job = http.get(r.json["statusUrl"]).json
    assert job["format"] == {"requested": "auto", "chosen": want, "accept": accept}
    assert api.store.get(r.json["jobId"]).options["format"] == want  # the worker gets a concrete format


def test_auto_as_the_server_default_and_health_lists_formats(api_server):
    http, _ = api_server(OUTPUT_FORMAT="auto", SUPPORTED_FORMATS="jpeg,png,avif")
    r = http.upload(files=[("image", "x", image_bytes("JPEG", (30, 20)))], headers={"Accept": "image/webp"})
    assert http.get(r.json["statusUrl"]).json["format"]["chosen"] == "webp"
    limits = http.get("/api/health").json["limits"]
    assert limits["formats"] == ["jpeg", "png", "avif"] and limits["outputFormat"] == "auto"
    assert {"webp", "jpeg", "png", "avif", "original", "auto"} <= set(limits["outputFormats"])
    r = http.upload(files=[("image", "x", image_bytes("JPEG", (30, 20)))], fields={"format": "tiff"})
    assert r.status == 400 and "avif" in r.json["error"]


def test_avif_upload_accepted_over_http_when_listed(api_server):
    http, _ = api_server(SUPPORTED_FORMATS="jpeg,avif")
    r = http.upload(files=[("image", "x.bin", encode(quadrants(), "AVIF"))], fields={"format": "avif"})
    assert r.status == 202, r.body
    r = http.upload(files=[("image", "x.bin", bomb(isobmff_ispe=(60000, 60000)))])
    assert r.status == 422 and r.json["code"] == "IMAGE_TOO_LARGE"
    r = http.upload(files=[("image", "x.mp4", box(b"ftyp", b"mp42\x00\x00\x00\x00isommp42") + box(b"mdat", b"x"))])
    assert r.status == 415 and r.json["code"] == "UNSUPPORTED_FORMAT"


# --- hostile headers, built box by box -----------------------------------------------------

def box(kind, payload):
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full(kind, payload, version=0, flags=0):
    return box(kind, bytes([version]) + flags.to_bytes(3, "big") + payload)


def bomb(brand=b"avif", codec=b"av01", isobmff_ispe=(64, 64), items=1, grid=None, tiles=(), idat=b"", sequence=None):
    """A HEIF file: item 1 is the primary (``codec`` or a grid of ``tiles``
    items of size ispe each); ``items`` extra plain items; optional moov."""
    types = {1: b"grid" if grid else codec}
    for i, _ in enumerate(tiles, start=2):
        types[i] = codec
    for i in range(items - 1):
        types[1000 + i] = b"Exif"
    infe = b"".join(full(b"infe", struct.pack(">HH", i, 0) + t + b"\x00", version=2) for i, t in types.items())
    props = [full(b"ispe", struct.pack(">II", *isobmff_ispe))] + [full(b"ispe", struct.pack(">II", *t)) for t in tiles]
    assoc = [(1, [1])] + [(i, [i]) for i in range(2, 2 + len(tiles))]
    ipma = full(b"ipma", struct.pack(">I", len(assoc)) + b"".join(
        struct.pack(">HB", item, len(ix)) + bytes(ix) for item, ix in assoc))
    meta = [full(b"hdlr", b"\x00" * 4 + b"pict" + b"\x00" * 13), full(b"pitm", struct.pack(">H", 1)),
            full(b"iinf", struct.pack(">H", len(types)) + infe),
            box(b"iprp", box(b"ipco", b"".join(props)) + ipma)]
    if tiles:
        meta.append(full(b"iref", box(b"dimg", struct.pack(">HH", 1, len(tiles)) +
                                       b"".join(struct.pack(">H", i) for i in range(2, 2 + len(tiles))))))
    if grid:
        # iloc v1: 4-byte offsets and lengths; item 1 built from idat (method 1), one extent
        meta.append(full(b"iloc", bytes([0x44, 0x00]) + struct.pack(">HHHHHII", 1, 1, 1, 0, 1, 0, len(grid)),
                         version=1))
        meta.append(box(b"idat", grid))
    out = box(b"ftyp", brand + b"\x00\x00\x00\x00" + brand + b"mif1miaf") + full(b"meta", b"".join(meta))
    if sequence:
        frames, w, h = sequence
        entry = box(b"av01", bytes(6) + b"\x00\x01" + bytes(16) + struct.pack(">HH", w, h) + bytes(50))
        stbl = box(b"stbl", full(b"stsd", struct.pack(">I", 1) + entry) + full(b"stsz", struct.pack(">II", 0, frames)))
        mdia = box(b"mdia", full(b"hdlr", b"\x00" * 4 + b"pict" + b"\x00" * 13) + box(b"minf", stbl))
        out += box(b"moov", box(b"trak", mdia))
    return out + box(b"mdat", b"\x00" * 64)


def grid_data(rows, cols, width, height):
    return struct.pack(">BBBBII", 0, 1, rows - 1, cols - 1, width, height)


HOSTILE = [
    ("huge ispe", dict(isobmff_ispe=(100_000, 100_000)), "IMAGE_TOO_LARGE"),
    ("zero ispe", dict(isobmff_ispe=(0, 64)), "INVALID_IMAGE"),
    ("many items", dict(items=isobmff.MAX_ITEMS + 10), "IMAGE_TOO_LARGE"),
    ("grid canvas bigger than its ispe", dict(grid=grid_data(1, 2, 60_000, 60_000), tiles=[(64, 64)] * 2),
     "IMAGE_TOO_LARGE"),
    ("grid of too many tile pixels", dict(isobmff_ispe=(4000, 4000), grid=grid_data(8, 8, 4000, 4000),
                                          tiles=[(4000, 4000)] * 64), "IMAGE_TOO_LARGE"),
    ("grid cells without tiles", dict(grid=grid_data(4, 4, 64, 64), tiles=[(16, 16)] * 3), "INVALID_IMAGE"),
    ("sequence frame bomb", dict(sequence=(100_000, 4000, 4000)), "IMAGE_TOO_LARGE"),
    ("JPEG coded in HEIF", dict(brand=b"mif1", codec=b"jpeg"), "UNSUPPORTED_FORMAT"),
]


@pytest.mark.parametrize("brand, codec", [(b"avif", b"av01")] + ([(b"heic", b"hvc1")] if formats.HAS_HEIF else []))
@pytest.mark.parametrize("what, spec, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_header_bombs_refused_before_decoding(tmp_path, monkeypatch, brand, codec, what, spec, code):
    spec = {"brand": brand, "codec": codec, **spec}
    if what == "sequence frame bomb" and brand != b"avif":
        pytest.skip("image sequences are read for AVIF only")
    path = _write(tmp_path, bomb(**spec))

    def no_decoder(*a, **k):
        raise AssertionError("a decoder was reached")

    monkeypatch.setattr(imaging.Image, "open", no_decoder)
    with pytest.raises(ImageError) as err:
        imaging.probe(path, ALL)
    assert err.value.code == code, err.value.message
    assert err.value.status == {"IMAGE_TOO_LARGE": 422, "INVALID_IMAGE": 422, "UNSUPPORTED_FORMAT": 415}[code]


def test_real_file_with_patched_ispe_is_refused_before_decoding(tmp_path, monkeypatch):
    samples = [encode(quadrants(), "AVIF")]
    if formats.HAS_HEIF:
        samples.append(encode(quadrants(), "HEIF"))
    monkeypatch.setattr(imaging.Image, "open", lambda *a, **k: pytest.fail("a decoder was reached"))
    for data in samples:
        at = data.index(b"ispe") + 8
        patched = data[:at] + struct.pack(">II", 30_000, 30_000) + data[at + 8:]
        with pytest.raises(ImageError) as err:
            imaging.probe(_write(tmp_path, patched), ALL)
        assert err.value.code == "IMAGE_TOO_LARGE"


@pytest.mark.parametrize("cut", [20, 60, 200, -10])
def test_truncated_and_wrong_brand(tmp_path, cut):
    data = encode(quadrants(), "AVIF")  # -10: the header is whole, the picture data is cut
    with pytest.raises(ImageError) as err:
        imaging.process(_write(tmp_path, data[:cut]), tmp_path, "j", {}, ALL)
    assert err.value.code == "INVALID_IMAGE"
    mp4 = box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41") + box(b"mdat", b"\x00" * 32)
    with pytest.raises(ImageError) as err:
        imaging.probe(_write(tmp_path, mp4), ALL)
    assert err.value.code == "UNSUPPORTED_FORMAT"


def test_python_client_auto_falls_back_locally_to_the_same_choice(tmp_path):
    from imgworker.client import ServerApiClient

    from helpers import free_port

    src = tmp_path / "photo.jpg"
    src.write_bytes(image_bytes("JPEG", (80, 60)))
    client = ServerApiClient(f"http://127.0.0.1:{free_port()}", limits=ALL)  # nothing listens there
    result = client.process_file(src, tmp_path / "out", {"format": "auto"})
    assert result.source == "local" and result.output.endswith(".avif")
    assert Image.open(result.output).format == "AVIF"


@needs_heif
def test_phone_heic_through_the_service_comes_back_as_avif(service, tmp_path):
    """Real processes: a HEIC upload with format=auto from an AVIF-capable
    client is processed by a worker, served as image/avif, and an orphan
    AVIF/HEIC file (no row) is swept by cleanup like any other."""
    from helpers import Http, free_port
    from conftest import wait_for

    port = free_port()
    svc = service("serve", PORT=port, SUPPORTED_FORMATS="jpeg,png,webp,avif,heic", CLEANUP_INTERVAL_MS=200)
    http = Http(f"http://127.0.0.1:{port}")
    wait_for(lambda: _status(http) == 200, 20, interval=0.05, message="service healthy")
    data = encode(quadrants((1600, 1200)), "HEIF", quality=80, exif=exif(6))
    r = http.upload(files=[("image", "IMG_0001.HEIC", data)], fields={"format": "auto"},
                    headers={"Accept": "image/avif,image/webp,*/*;q=0.8"})
    assert r.status == 202, r.body
    job = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
        http.get(r.json["statusUrl"]).json), 60, interval=0.05, message="job finished")
    assert job["status"] == "completed", job
    assert job["format"]["chosen"] == "avif" and job["result"]["processedFile"]["format"] == "avif"
    image = http.get(job["result"]["processedFile"]["url"])
    assert image.status == 200 and image.getheader("Content-Type") == "image/avif"
    out = Image.open(io.BytesIO(image.body))
    assert out.format == "AVIF" and out.size == (768, 1024) and blue_corner(out) == ["tr"]
    import os
    import time

    old = time.time() - 3600
    orphans = [svc.storage.uploads / ("e" * 32 + f"-{os.getpid()}.heic"), svc.storage.processed / f"processed_{'f' * 32}.avif"]
    for p in orphans:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    wait_for(lambda: not any(p.exists() for p in orphans), 20, interval=0.1, message="orphans swept")


def _status(http):
    try:
        return http.get("/api/health").status
    except OSError:
        return None


@pytest.mark.parametrize("tail", [struct.pack(">I4sQ", 1, b"free", 2**63 + 5), struct.pack(">I4s", 0xFFFFFFF0, b"mdat")],
                         ids=["64-bit size past any file", "box longer than the file"])
def test_box_sizes_past_the_end_are_invalid_not_io_errors(tmp_path, tail):
    # found by fuzzing: a seek to 2**63 was reported as a (retried, 500) IO_ERROR
    with pytest.raises(ImageError) as err:
        imaging.probe(_write(tmp_path, encode(quadrants(), "AVIF") + tail), ALL)
    assert err.value.code == "INVALID_IMAGE"
