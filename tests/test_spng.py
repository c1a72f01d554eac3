"""libspng's PNG decode (imgworker.spng): Pillow's pixels, Pillow's errors,
Pillow when libspng is missing, a clean failure at the worker's memory cap;
the image data inflated by libdeflate where it can be, libspng reading the
file where not, with the same outcome either way."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from imgworker import spng
from imgworker.errors import ImageError
from imgworker.imaging import Limits, process

from helpers import image_bytes


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i < len(png):
        length, = struct.unpack(">I", png[i:i + 4])
        out.append((png[i + 4:i + 8], png[i + 8:i + 8 + length]))
        i += 12 + length
    return out


def build(parts) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data)) for cid, data in parts)


def interlaced(png: bytes) -> bytes:
    """The same picture as an Adam7-interlaced PNG (Pillow cannot write
    one): every pass's rows unfiltered (filter type 0)."""
    im = Image.open(io.BytesIO(png))
    w, h = im.size
    depth = {"RGB": 3, "RGBA": 4}[im.mode]
    raw = im.tobytes()
    data = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        for y in range(y0, h, dy):
            row = raw[y * w * depth:(y + 1) * w * depth]
            data.append(0)
            for x in range(x0, w, dx):
                data += row[x * depth:(x + 1) * depth]
    parts = chunks(png)
    ihdr = parts[0][1][:12] + b"\x01"
    return build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(bytes(data))), (b"IEND", b"")])


INFLATED = "image data inflated by libdeflate"


@pytest.fixture
def decodes(monkeypatch):
    """The pictures libspng decodes: the file's path when it reads the file,
    INFLATED when it gets the image data libdeflate inflated."""
    lib = spng._get_library()
    assert lib is not None, "pyspng is a dependency: libspng must load and pass its self-check"
    assert lib.inflate is not None, "deflate is a dependency: libdeflate must pass the self-check"
    calls = []
    real = type(lib).decode

    def counted(self, *args, **kwargs):
        calls.append(INFLATED if kwargs.get("checked") else args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(lib), "decode", counted)
    return calls


def pillow_only(monkeypatch):
    monkeypatch.setattr(spng, "_library", [None])


def loaded(path, fast: bool):
    """(mode, pixels, info) of ``path`` decoded by spng.load (fast) or Pillow."""
    im = Image.open(path, formats=("PNG",))
    got = spng.load(im) if fast else (im.load(), im)[1]
    return got.mode, got.tobytes(), dict(got.info)


@pytest.mark.parametrize("mode, save", [("RGB", {}), ("RGBA", {}), ("RGB", {"transparency": (10, 20, 30)}),
                                        ("RGBA", {"compress_level": 9})])
def test_libspng_gives_pillows_pixels_mode_and_info(tmp_path, photo_png, decodes, mode, save):
    """An RGBA PNG with real transparency (alpha 0 to 255), an RGB one with a
    tRNS colour key (kept in info["transparency"], as Pillow does): libspng
    decodes them, to exactly Pillow's pixels."""
    path = tmp_path / "in.png"
    path.write_bytes(photo_png(mode, **save))
    assert loaded(path, fast=True) == loaded(path, fast=False)
    assert decodes == [INFLATED]


@pytest.mark.parametrize("case", ["L", "LA", "P", "P+tRNS", "RGB 16-bit", "RGB interlaced", "RGBA interlaced",
                                  "APNG"])
def test_other_pngs_are_pillows(tmp_path, photo_png, decodes, case):
    """Grey, grey + alpha, palette and interlaced PNGs decode faster in
    Pillow (measured); 16-bit and animated ones are Pillow's by design."""
    if case == "P+tRNS":
        data = photo_png("P", transparency=bytes(range(0, 200, 2)))
    elif case == "RGB 16-bit":
        buf = io.BytesIO()
        Image.new("I;16", (40, 30), 40000).save(buf, "PNG")
        parts = chunks(buf.getvalue())  # make it RGB 16-bit: colour type 2, 6 bytes a pixel
        ihdr = parts[0][1][:9] + b"\x02" + parts[0][1][10:]
        raw = b"".join(b"\0" + b"\x9c\x40\x10\x00\xff\xff" * 40 for _ in range(30))
        data = build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])
    elif case.endswith("interlaced"):
        data = interlaced(photo_png(case.split()[0]))
    elif case == "APNG":
        frames = [Image.new("RGBA", (40, 30), color) for color in ((255, 0, 0, 255), (0, 0, 255, 128))]
        buf = io.BytesIO()
        frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
        data = buf.getvalue()
    else:
        data = photo_png(case)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    assert loaded(path, fast=True) == loaded(path, fast=False)
    assert decodes == []


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_a_job_gives_the_same_bytes_with_or_without_libspng(tmp_path, photo_png, monkeypatch, decodes, fmt):
    """The whole pipeline (fit, an RGBA picture with real transparency
    composited on white for JPEG) gives byte-identical output either way."""
    src = tmp_path / "in.png"
    src.write_bytes(photo_png("RGBA", size=(640, 400)))
    options = {"format": fmt, "maxWidth": 320}
    out = {}
    for fast in (True, False):
        if not fast:
            pillow_only(monkeypatch)
        (tmp_path / str(fast)).mkdir()
        outcome = process(src, tmp_path / str(fast), "j", options, Limits())
        out[fast] = (outcome.output_width, outcome.output_height,
                     (tmp_path / str(fast) / f"processed_j.{'jpg' if fmt == 'jpeg' else fmt}").read_bytes())
    assert out[True] == out[False]
    assert out[True][:2] == (320, 200) and decodes == [INFLATED]


def _corrupt(kind: str, png: bytes) -> bytes:
    parts = chunks(png)
    head = [p for p in parts if p[0] not in (b"IDAT", b"IEND")]
    idat = b"".join(d for c, d in parts if c == b"IDAT")
    whole = build(head + [(b"IDAT", idat), (b"IEND", b"")])
    if kind == "cut inside the image data":  # the probe refuses it before any decoder
        return whole[:len(whole) // 2]
    if kind == "image data ends early":  # the chunks are whole, the pixels are not
        return build(head + [(b"IDAT", zlib.compress(zlib.decompress(idat)[:-5000])), (b"IEND", b"")])
    if kind == "cut in a chunk after the image data":  # the pixels are complete; Pillow reads on and fails
        return build(head + [(b"IDAT", idat), (b"tEXt", b"k\0" + b"v" * 300), (b"IEND", b"")])[:-150]
    if kind == "cut in a second image data chunk":  # the corpus's truncated_end_chunk.png; the probe refuses it
        return build(head + [(b"IDAT", idat)]) + struct.pack(">I", 30000) + b"IDAT"
    if kind == "bad zlib checksum":
        return build(head + [(b"IDAT", idat[:-4] + bytes(b ^ 0xFF for b in idat[-4:])), (b"IEND", b"")])
    if kind == "bad filter type":
        raw = bytearray(zlib.decompress(idat))
        raw[0] = 9
        return build(head + [(b"IDAT", zlib.compress(bytes(raw))), (b"IEND", b"")])
    if kind == "bad image data CRC":  # Pillow ignores it, so does the result
        i = whole.index(b"IDAT") + 4 + len(idat)
        return whole[:i] + b"\0\0\0\0" + whole[i + 4:]
    if kind == "no IEND":  # Pillow accepts it, so does the result
        return build(head + [(b"IDAT", idat)])
    if kind == "a second IHDR":  # Pillow takes the second (RGB), libspng must not decode by the first (RGBA)
        ihdr = next(d for c, d in parts if c == b"IHDR")
        return build(head + [(b"IHDR", ihdr[:9] + b"\x02" + ihdr[10:]), (b"IDAT", idat), (b"IEND", b"")])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, code", [
    ("cut inside the image data", "INVALID_IMAGE"), ("image data ends early", "INVALID_IMAGE"),
    ("cut in a chunk after the image data", "INVALID_IMAGE"),
    ("cut in a second image data chunk", "INVALID_IMAGE"), ("bad zlib checksum", "INVALID_IMAGE"),
    ("bad filter type", "INVALID_IMAGE"), ("bad image data CRC", None), ("no IEND", None),
    ("a second IHDR", "INVALID_IMAGE")])
def test_a_broken_png_has_pillows_outcome(tmp_path, photo_png, monkeypatch, decodes, kind, code):
    """libspng is laxer than Pillow on some broken files (it stops reading
    when the pixels are complete) and stricter on others; either way the job
    ends as it does with Pillow alone: the same error code, or the same bytes."""
    src = tmp_path / "in.png"
    src.write_bytes(_corrupt(kind, photo_png("RGBA")))

    def outcome():
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        try:
            process(src, out, "j", {"format": "png"}, Limits())
        except ImageError as exc:
            return exc.code
        return (out / "processed_j.png").read_bytes()

    fast = outcome()
    assert bool(decodes) == (kind not in ("cut inside the image data", "cut in a second image data chunk"))
    pillow_only(monkeypatch)
    assert fast == outcome()
    assert fast == code if code else isinstance(fast, bytes)


def outcome(path):
    """What spng.load gives for ``path`` and what Pillow alone gives: the
    mode, pixels and info, or the type of the exception."""
    got = []
    for fast in (True, False):
        try:
            got.append(loaded(path, fast))
        except Exception as exc:
            got.append(type(exc).__name__)
    return got


def filtered(raw: bytes, width: int, depth: int) -> bytes:
    """The rows of ``raw`` (``width`` pixels of ``depth`` bytes) filtered
    with PNG filter types 0-4 in turn, row by row (Pillow's encoder picks
    its own)."""
    stride, out, prior = width * depth, bytearray(), bytes(width * depth)
    for y in range(len(raw) // stride):
        row, kind = raw[y * stride:(y + 1) * stride], y % 5
        out.append(kind)
        for x in range(stride):
            a = row[x - depth] if x >= depth else 0
            b, c = prior[x], prior[x - depth] if x >= depth else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else b if pb <= pc else c
            out.append((row[x] - (0, a, b, (a + b) // 2, paeth)[kind]) & 0xFF)
        prior = row
    return bytes(out)


def png_of(im: Image.Image, stream: bytes | None = None, split: int = 0) -> bytes:
    """A PNG of ``im`` (RGB or RGBA) with the zlib ``stream`` as image data
    (by default its rows filtered with every filter type, compressed),
    in IDAT chunks of ``split`` bytes (0: one chunk), an empty one after
    every third."""
    depth = len(im.mode)
    if stream is None:
        stream = zlib.compress(filtered(im.tobytes(), im.width, depth), 6)
    ihdr = struct.pack(">IIBBBBB", im.width, im.height, 8, {3: 2, 4: 6}[depth], 0, 0, 0)
    step = split or len(stream)
    idats = []
    for n, i in enumerate(range(0, len(stream), step)):
        idats += [(b"IDAT", stream[i:i + step])] + ([(b"IDAT", b"")] if n % 3 == 2 else [])
    return build([(b"IHDR", ihdr), *idats, (b"IEND", b"")])


@pytest.fixture
def picture():
    """A photo-like picture (smooth colour noise; RGBA: an alpha ramp)."""
    def make(mode, size=(61, 47)):
        im = Image.merge("RGB", [Image.effect_noise((size[0] // 8 + 1, size[1] // 8 + 1), 80 + 20 * i).resize(size)
                                 for i in range(3)])
        if mode == "RGBA":
            im.putalpha(Image.linear_gradient("L").resize(size))
        return im
    return make


@pytest.fixture
def any_size(monkeypatch):
    """libdeflate inflates small pictures too (they are below its threshold)."""
    monkeypatch.setattr(spng, "_MIN_INFLATED", 0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("size, save", [((1, 1), {}), ((61, 47), {"compress_level": 0}),
                                        ((61, 47), {"compress_level": 1}), ((300, 7), {"optimize": True}),
                                        ((7, 300), {"compress_level": 9}), ((1000, 700), {})])
def test_inflated_image_data_gives_pillows_pixels(tmp_path, picture, decodes, any_size, mode, size, save):
    """Pillow's PNGs of several sizes and compress levels (0: stored blocks
    only), the last one 2.8 MB decoded: libspng decodes the image data
    libdeflate inflated to exactly Pillow's pixels, mode and info."""
    path = tmp_path / "in.png"
    picture(mode, size).save(path, "PNG", **save)
    fast, pillow = outcome(path)
    assert fast == pillow and decodes == [INFLATED]


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("case", ["every filter type", "stored blocks only", "many chunks",
                                  "garbage after the stream", "stored PNG in several chunks"])
def test_inflated_image_data_of_any_layout(tmp_path, picture, decodes, any_size, monkeypatch, mode, case):
    """Rows filtered with each of the five filter types; a zlib stream of
    stored blocks; image data in 97-byte chunks with empty ones among them;
    bytes after the zlib stream's end (Pillow stops at the last row, so does
    libdeflate); the PNG given to libspng split into several IDAT chunks (as
    above 1 GiB): all decoded from the inflated data to Pillow's pixels."""
    im = picture(mode)
    stream = zlib.compress(filtered(im.tobytes(), im.width, len(mode)), 6)
    if case == "stored blocks only":
        data = png_of(im, zlib.compress(filtered(im.tobytes(), im.width, len(mode)), 0))
    elif case == "many chunks":
        data = png_of(im, split=97)
    elif case == "garbage after the stream":
        data = png_of(im, stream + b"garbage" * 50)
    elif case == "stored PNG in several chunks":
        monkeypatch.setattr(spng, "_STORED", 1000)
        monkeypatch.setattr(spng, "_BLOCKS_PER_CHUNK", 3)
        data = png_of(im)
    else:
        data = png_of(im)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    fast, pillow = outcome(path)
    assert isinstance(pillow, tuple) and fast == pillow
    assert decodes == [INFLATED]
    if case == "every filter type":
        assert Image.open(path).tobytes() == im.tobytes()


@pytest.mark.parametrize("case, inflated", [
    ("stream one byte short", False), ("rows one byte short", False), ("rows one byte long", False),
    ("bad zlib checksum", False), ("bad image data CRC", True), ("no zlib checksum", False),
    ("preset dictionary", False)])
def test_broken_image_data_has_pillows_outcome(tmp_path, picture, decodes, any_size, case, inflated):
    """Where libdeflate's result is not exactly the picture's rows with a
    valid checksum, libspng reads the file as before (and Pillow decodes
    what it refuses): the outcome is Pillow's, pixels or exception type. A
    bad image data CRC is ignored, by Pillow and by this path alike."""
    im = picture("RGBA")
    rows = filtered(im.tobytes(), im.width, 4)
    stream = zlib.compress(rows, 6)
    data = {
        "stream one byte short": lambda: png_of(im, stream[:-1]),
        "rows one byte short": lambda: png_of(im, zlib.compress(rows[:-1])),
        "rows one byte long": lambda: png_of(im, zlib.compress(rows + b"\0")),
        "bad zlib checksum": lambda: png_of(im, stream[:-4] + bytes(b ^ 0x55 for b in stream[-4:])),
        "bad image data CRC": lambda: png_of(im).replace(zlib.crc32(b"IDAT" + stream).to_bytes(4, "big"), b"\0" * 4),
        "no zlib checksum": lambda: png_of(im, stream[:-4]),
        "preset dictionary": lambda: png_of(im, b"\x78\xbb" + zlib.adler32(b"").to_bytes(4, "big") + stream[2:]),
    }[case]()
    path = tmp_path / "in.png"
    path.write_bytes(data)
    fast, pillow = outcome(path)
    assert fast == pillow
    assert decodes[:1] == ([INFLATED] if inflated else [str(path)])


@pytest.mark.parametrize("over", [0, 1])
def test_image_data_in_too_many_chunks_is_left_to_libspng(tmp_path, picture, decodes, any_size, monkeypatch, over):
    """Joining the image data chunks is a Python step each: past
    MAX_SEGMENTS of them (a hostile file of tiny chunks; real encoders
    write 8 KB and more) libspng reads the file, with Pillow's outcome."""
    im = picture("RGBA")
    data = png_of(im, split=97)
    chunks = data.count(b"IDAT")
    monkeypatch.setattr(spng, "MAX_SEGMENTS", chunks - over)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    fast, pillow = outcome(path)
    assert isinstance(pillow, tuple) and fast == pillow
    assert decodes == ([str(path)] if over else [INFLATED])


@pytest.mark.parametrize("failure", ["DeflateError", "MemoryError", "short", "no address space"])
def test_a_failed_inflate_leaves_libspng_the_file(tmp_path, photo_png, decodes, monkeypatch, failure):
    """libdeflate failing or out of memory (or too little address space for
    this path's buffers under the worker's cap): libspng reads the file."""
    import deflate

    lib = spng._get_library()
    real = lib.inflate

    def failing(data, size):
        if failure == "short":
            return real(data, size)[:-1]
        raise deflate.DeflateError("Decompression failed") if failure == "DeflateError" else MemoryError

    monkeypatch.setattr(lib, "inflate", failing)
    if failure == "no address space":
        monkeypatch.setattr(lib, "inflate", real)
        monkeypatch.setattr(spng, "fits_in_address_space", lambda need: False)
    path = tmp_path / "in.png"
    path.write_bytes(photo_png("RGBA"))
    fast, pillow = outcome(path)
    assert fast == pillow and decodes == [str(path)]


def test_without_deflate_libspng_reads_the_file(tmp_path, photo_png, monkeypatch):
    """deflate not installed (or not importable): libspng reads the file."""
    monkeypatch.setitem(sys.modules, "deflate", None)  # import deflate raises ImportError
    monkeypatch.setattr(spng, "_library", [])
    lib = spng._get_library()
    assert lib is not None and lib.inflate is None
    calls = []
    real = spng._Library.decode
    monkeypatch.setattr(spng._Library, "decode", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    path = tmp_path / "in.png"
    path.write_bytes(photo_png("RGB"))
    fast, pillow = outcome(path)
    assert fast == pillow and calls == [str(path)]


def test_a_libdeflate_that_disagrees_is_not_used(monkeypatch):
    """The self-check also decodes through libdeflate: a ``deflate`` that
    gets the rows wrong leaves libspng reading files, Pillow's pixels still."""
    import deflate

    def off_by_one(data, size):
        rows = deflate.zlib_decompress(data, size)
        rows[-1] ^= 1
        return rows

    monkeypatch.setattr(deflate, "zlib_decompress", off_by_one)
    lib = spng._checked_library()
    assert lib is not None and lib.inflate is None


def test_without_pyspng_pillow_decodes(tmp_path, photo_png, monkeypatch):
    """pyspng not installed (or not importable): Pillow decodes every PNG."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspng" else real(name, *a))
    monkeypatch.setattr(spng, "_library", [])
    assert spng._get_library() is None
    src = tmp_path / "in.png"
    src.write_bytes(photo_png("RGBA"))
    (tmp_path / "out").mkdir()
    assert process(src, tmp_path / "out", "j", {"format": "webp"}, Limits()).output_width == 301
    assert loaded(src, fast=True) == loaded(src, fast=False)


def test_a_libspng_that_disagrees_with_pillow_is_not_used(monkeypatch):
    """The self-check compares libspng's pixels with Pillow's: a build that
    decodes differently (another ABI, a bug) leaves every PNG to Pillow."""
    real = spng._Library.decode

    def off_by_one(self, *args):
        pixels = real(self, *args)
        pixels[0] ^= 1
        return pixels

    monkeypatch.setattr(spng._Library, "decode", off_by_one)
    assert spng._checked_library() is None


_DECODE_UNDER_A_CAP = r"""
import resource, sys
from imgworker import imaging, spng
from imgworker.errors import ImageError
from imgworker.limits import Limits

assert spng._get_library() is not None
real_load, headroom = spng.load, [0]
UNCAPPED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def capped_load(im):
    # the cap falls just before the decode and stays while a failure is handled
    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom[0] * 2**20, resource.RLIM_INFINITY))
    return real_load(im)


spng.load = capped_load
for headroom[0] in range(1, 41, 3):
    resource.setrlimit(resource.RLIMIT_AS, UNCAPPED)
    try:
        imaging.process(sys.argv[1], sys.argv[2], "j", {"format": "jpeg"}, Limits())
        print("ok", flush=True)
    except ImageError as exc:
        print(exc.code, flush=True)
    except BaseException as exc:
        print(type(exc).__name__, flush=True)
"""


def test_libspng_out_of_memory_fails_cleanly(tmp_path, photo_png):
    """A worker's address space is capped (WORKER_MAX_RSS_MB x 2). libspng is
    C and reports a failed allocation; our buffer raises MemoryError: either
    way Pillow decodes instead, and fails as IMAGE_TOO_LARGE where memory is
    short, never aborting the worker. Decoded under caps from 1 to 40 MB above
    what the process holds (the picture is 9.6 MB decoded): each attempt
    works or is IMAGE_TOO_LARGE, and both happen."""
    src = tmp_path / "in.png"
    src.write_bytes(photo_png("RGBA", size=(2000, 1200)))
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-c", _DECODE_UNDER_A_CAP, str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    outcomes = run.stdout.split()
    assert run.returncode == 0 and len(outcomes) == 14, run.stdout + run.stderr[-500:]
    assert set(outcomes) == {"ok", "IMAGE_TOO_LARGE"}, run.stdout


_IMPORTS = r"""
import sys
from imgworker import imaging
from imgworker.limits import Limits
for path in sys.argv[2:]:
    imaging.process(path, sys.argv[1], "j", {"format": "webp"}, Limits())
    print("imgworker.spng" in sys.modules, "numpy" in sys.modules)
"""


def test_libspng_is_loaded_at_the_first_png_job_and_numpy_never(tmp_path, photo_png):
    """Start-up and workers that never see a PNG do not pay for it; numpy
    (pyspng's dependency, 100 ms of CPU to import) is never imported."""
    (tmp_path / "in.jpg").write_bytes(image_bytes("JPEG"))
    (tmp_path / "in.png").write_bytes(photo_png("RGB"))
    run = subprocess.run([sys.executable, "-c", _IMPORTS, str(tmp_path), str(tmp_path / "in.jpg"),
                          str(tmp_path / "in.png")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.split("\n")[:2] == ["False False", "True False"]
