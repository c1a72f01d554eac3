"""libspng for the pixel decode of still 8-bit PNGs: the same pixels as
Pillow's own PNG decoder for under 0.6x its CPU on big RGB/RGBA images (its
unfilter is scalar C, libspng's is SIMD, and libdeflate inflates for it;
see the README, "Dependencies").

Contract: :func:`load` takes a PNG Pillow has opened (header and chunks
before the image data read, nothing decoded) and returns it loaded: the same
mode, pixels and ``info`` that ``im.load()`` gives, and the same exception
when that would fail. Only the pixels of a still, non-interlaced, 8-bit RGB
or RGBA PNG come from libspng (where it is faster, see _PLANS); every other
PNG (grey, palette, 16-bit, interlaced, APNG) is Pillow's, as is every file
libspng refuses or fails on (truncated, corrupt, out of memory): Pillow then
decodes it and succeeds or raises exactly as without libspng.

Why each step:
- libspng is the C library inside the ``pyspng`` wheel, whose extension
  module exports its API; we call it with ctypes. ``pyspng.load`` itself would
  import numpy (100 ms of CPU, paid by every ``imgworker process --local``)
  and copy the whole file twice (peak RSS 52 -> 104 MB on a 3640x2400 RGBA
  PNG). Here libspng reads the file itself and decodes into one buffer that
  becomes the Pillow image's memory, in Pillow's own pixel layout, no copy.
- Pillow still reads the chunks: after libspng has the pixels, Pillow's own
  load() runs with a decoder that only consumes the image data, so the chunk
  walk, the chunks after the image data (an eXIf or iCCP there lands in
  ``info`` as before) and every error on that path are Pillow's. If anything
  fails on that path, Pillow decodes the file afresh and its outcome stands.
- libspng checks the image data's CRCs and zlib checksum (its defaults).
  Pillow ignores those CRCs but checks the checksum when its decoder gets
  that far: a file libspng refuses for either goes to Pillow, whose verdict
  stands. (Not checking them would save 12 % of libspng's time, but libspng
  can only skip both, and then it would accept a bad checksum Pillow refuses.)
- Inflating is most of libspng's time (its zlib 1.2.11's inflate_fast,
  ~53 % on a 3640x2400 RGBA PNG). libdeflate (the ``deflate`` package)
  inflates a whole buffer ~1.9x faster (82 ms instead of 156 for that PNG's
  20 MB of image data), into a buffer of exactly the size the header implies
  (``height * (1 + width * channels)``: it can never write more, so no
  decompression bomb), and checks the adler32. So above _MIN_INFLATED we
  read the file, join its image data chunks in place, let libdeflate
  inflate them, wrap the rows in stored deflate blocks in place (a PNG of
  IHDR as Pillow read it, IDAT, IEND) and libspng decodes that with neither
  checksum nor CRCs (both would be of our own bytes): it only copies the
  rows and unfilters. Anything short of exactly the rows with a valid
  checksum (an error, a stream that ends early or runs on, a chunk past the
  end of the file, MemoryError) leaves libspng reading the file as before,
  and that outcome stands; a bad image data CRC is ignored, as Pillow does.
  Bytes after the zlib stream's end are ignored (Pillow stops at the last
  row too). Measured (CPU, min of 5, with the worker's heap settings,
  heap.keep_freed_memory; ``load`` alone, then a whole job fit to 1024 with
  JPEG / WebP out): the 3640x2400 RGBA PNGs 198 -> 120 ms (Pillow 265),
  jobs 226 -> 146 / 386 -> 299 ms (opaque alpha: 228 -> 148 / 284 -> 207);
  with malloc's defaults 212 -> 149 ms; the mate-backgrounds PNGs
  (1440-2140 px) 0.23-0.91x their time (Flow.png 25 -> 9 ms); a 64x64
  picture broke even, hence the threshold. Peak RSS on the 3640x2400 PNG: 53 -> 86 MiB (the file and the
  rows, then the rows and the pixels, never the three): the path runs only
  where that fits under the worker's address-space cap (the ``deflate``
  extension does not check its decompressor's malloc), else libspng reads
  the file. The one difference from Pillow: libdeflate accepts a few things
  RFC 1951 forbids and zlib refuses (length symbols 286-287 and distance
  symbols 30-31, more than 286/30 code lengths, an incomplete code-length
  code with one codeword); a crafted stream using one, with a valid
  checksum, decodes here where Pillow raises. No encoder writes them.
- Once per process, before the first use, libspng decodes a small PNG of
  each mode and must give Pillow's pixels, from the file and through
  libdeflate; a missing or incompatible pyspng (another libspng ABI,
  symbols not exported) leaves Pillow doing everything, a missing or
  disagreeing ``deflate`` leaves libspng reading files.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageFile, PngImagePlugin

from .limits import fits_in_address_space
from .probe import MAX_SEGMENTS

# libspng 0.7's enum values (spng.h)
_FMT_RGBA8 = 1
_CTX_IGNORE_ADLER32 = 1  # spng_ctx_flags: no zlib checksum (zlib's inflateValidate(0))
_CRC_USE = 2  # spng_crc_action: neither compute nor check chunk CRCs
_CHUNK_LIMIT = 64 * 2**20  # bytes of one ancillary chunk / of all of them libspng may keep

# Pillow's raw mode of the image data -> (libspng output format, bytes per
# pixel). Pillow keeps RGB in 4 bytes a pixel (R, G, B, 255): libspng's RGBA8
# of an RGB PNG is exactly that (no tRNS flag: the alpha of RGB is 255, as
# Pillow's padding; a tRNS colour key stays in info["transparency"] as Pillow
# leaves it). Only RGB and RGBA, not interlaced: measured on a 3000x2000
# photo (min of 5, CPU), libspng takes 0.68-0.70x Pillow's time for those but
# 1.09-1.20x for L, LA and palette PNGs (Pillow's 1-2 byte unfilter is cheap,
# libspng's checksums and expansion are not) and 1.08-1.11x for interlaced
# RGB/RGBA.
_PLANS = {"RGBA": (_FMT_RGBA8, 4), "RGB": (_FMT_RGBA8, 4)}
_CHANNELS = {"RGB": 3, "RGBA": 4}  # samples a pixel in the PNG's image data
_COLOUR_TYPES = {"RGB": 2, "RGBA": 6}  # IHDR colour type

_STORED = 65535  # bytes in a stored deflate block, the most one holds
_BLOCKS_PER_CHUNK = 16384  # stored blocks in one IDAT chunk: just under 1 GiB (a chunk's length is < 2**31)
_MIN_INFLATED = 32 * 1024  # bytes of filtered rows from which libdeflate inflates (below: no gain, measured)

_SKIP = "imgworker_spng_skip"


class _IHDR(ctypes.Structure):
    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32), ("bit_depth", ctypes.c_uint8),
                ("color_type", ctypes.c_uint8), ("compression_method", ctypes.c_uint8),
                ("filter_method", ctypes.c_uint8), ("interlace_method", ctypes.c_uint8)]


class SpngError(Exception):
    """libspng refused or failed (the caller lets Pillow decode instead)."""


class _Library:
    """libspng's functions (from pyspng's extension module) and libc's fopen."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        libc = ctypes.CDLL(None)
        p, i, size_t = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        for name, restype, argtypes in (
                ("spng_version_string", ctypes.c_char_p, []),
                ("spng_strerror", ctypes.c_char_p, [i]),
                ("spng_ctx_new", p, [i]),
                ("spng_ctx_free", None, [p]),
                ("spng_set_png_file", i, [p, p]),
                ("spng_set_png_buffer", i, [p, p, size_t]),
                ("spng_set_chunk_limits", i, [p, size_t, size_t]),
                ("spng_set_crc_action", i, [p, i, i]),
                ("spng_get_ihdr", i, [p, ctypes.POINTER(_IHDR)]),
                ("spng_decoded_image_size", i, [p, i, ctypes.POINTER(size_t)]),
                ("spng_decode_image", i, [p, p, size_t, i, i])):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name[5:], function)
        self.fopen, self.fclose = libc.fopen, libc.fclose
        self.fopen.restype, self.fopen.argtypes = p, [ctypes.c_char_p, ctypes.c_char_p]
        self.fclose.restype, self.fclose.argtypes = i, [p]
        self.version = self.version_string().decode()
        # deflate.zlib_decompress once the self-check passed through it (_decode_inflated)
        self.inflate: Callable[[Any, int], bytearray] | None = None

    def decode(self, source: str | bytearray, fmt: int, size: tuple[int, int], depth: int,
               checked: bool = False) -> bytearray:
        """The pixels of the PNG file at path ``source`` (or of the PNG in
        ``source``, a bytearray) in ``fmt``: ``size[1]`` rows of ``size[0] * depth`` bytes.
        ``checked``: ``source`` is a PNG we built (_stored_png) from image
        data whose checksum libdeflate verified; libspng checks neither its
        CRCs nor its zlib checksum. Raises SpngError, or MemoryError for our
        buffer."""
        ctx = self.ctx_new(_CTX_IGNORE_ADLER32 if checked else 0)
        if not ctx:
            raise SpngError("spng_ctx_new failed")
        fh = None
        try:
            self._check(self.set_chunk_limits(ctx, _CHUNK_LIMIT, _CHUNK_LIMIT))
            if checked:
                self._check(self.set_crc_action(ctx, _CRC_USE, _CRC_USE))
            if isinstance(source, bytearray):
                buffer = ctypes.c_char.from_buffer(source)  # no copy; source cannot be resized meanwhile
                self._check(self.set_png_buffer(ctx, ctypes.addressof(buffer), len(source)))
            else:
                fh = self.fopen(os.fsencode(source), b"rb")
                if not fh:
                    raise SpngError(f"cannot open {source}")
                self._check(self.set_png_file(ctx, fh))
            ihdr = _IHDR()
            self._check(self.get_ihdr(ctx, ctypes.byref(ihdr)))
            need = ctypes.c_size_t()
            self._check(self.decoded_image_size(ctx, fmt, ctypes.byref(need)))
            if (ihdr.width, ihdr.height) != size or need.value != size[0] * size[1] * depth:
                raise SpngError(f"libspng sees {ihdr.width}x{ihdr.height} ({need.value} bytes), Pillow {size}")
            pixels = bytearray(need.value)  # MemoryError under the worker's RLIMIT_AS: a clean failure
            address = ctypes.addressof(ctypes.c_char.from_buffer(pixels))
            self._check(self.decode_image(ctx, address, need.value, fmt, 0))
            return pixels
        finally:
            self.ctx_free(ctx)
            if fh:
                self.fclose(fh)

    def _check(self, code: int) -> None:
        if code != 0:
            raise SpngError(f"libspng: {self.strerror(code).decode(errors='replace')}")


class _End:
    """Whether the image data has ended (set by _walk's reader)."""

    ended = False


class _SkipDecoder(ImageFile.PyDecoder):
    """Consumes the image data (libspng already decoded it) so that Pillow's
    own load() walks the chunks; done when the image data ends (the tile's
    argument, an _End, says when)."""

    _pulls_fd = False

    def decode(self, buffer: bytes | Image.SupportsArrayInterface) -> tuple[int, int]:
        return (-1, 0) if self.args[0].ended else (len(buffer), 0)  # type: ignore[arg-type]


_library: list[_Library | None] = []  # decided once per process


def _get_library() -> _Library | None:
    if not _library:
        _library.append(_checked_library())
    return _library[0]


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("pyspng")  # finds, does not import (numpy stays out)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"_pyspng_c{suffix}"
            if candidate.is_file():
                return str(candidate)
    return None


def _checked_library() -> _Library | None:
    """libspng, once it has decoded a small PNG of each mode we use to exactly
    Pillow's pixels, from the file and (setting its ``inflate``) from the
    image data inflated by libdeflate; None when pyspng is missing, is
    another libspng (0.7 is the ABI declared above) or disagrees. A missing
    or disagreeing ``deflate`` only leaves ``inflate`` None."""
    try:
        path = _extension_path()
        if path is None:
            return None
        lib = _Library(path)
        if not lib.version.startswith("0.7."):
            return None
        Image.register_decoder(_SKIP, _SkipDecoder)
        inflate = _deflate()
        card = Image.linear_gradient("L").resize((37, 23)).convert("RGB")
        card.paste((200, 30, 60), (5, 5, 20, 15))
        for mode in _PLANS:
            src = card.convert(mode)
            if mode == "RGBA":
                src.putalpha(Image.linear_gradient("L").resize((37, 23)))
            buf = io.BytesIO()
            src.save(buf, "PNG", compress_level=1)
            with Image.open(io.BytesIO(buf.getvalue()), formats=("PNG",)) as want:
                want.load()
            for via_inflate in (False, True) if inflate else (False,):
                with Image.open(io.BytesIO(buf.getvalue()), formats=("PNG",)) as got:
                    fmt, depth = _PLANS[mode]
                    if _plan(got, need_file=False) != (fmt, depth):
                        return None
                    if via_inflate:
                        try:
                            rows = _inflated_rows(inflate, bytearray(buf.getvalue()), got.tile[0].offset,
                                                  _raw_size(got.size, mode))
                            pixels = None if rows is None else lib.decode(_stored_png(got.size, mode, rows), fmt,
                                                                          got.size, depth, checked=True)
                        except Exception:
                            pixels = None
                    else:
                        pixels = lib.decode(bytearray(buf.getvalue()), fmt, got.size, depth)
                    if pixels is not None:
                        _install(got, pixels, mode, depth)
                        _walk(got)
                    if pixels is None or got.mode != want.mode or got.tobytes() != want.tobytes():
                        if not via_inflate:
                            return None
                        inflate = None
        lib.inflate = inflate
        return lib
    except Exception:  # an incompatible build: Pillow does every decode
        return None


def _deflate() -> Callable[[Any, int], bytearray] | None:
    """``deflate.zlib_decompress`` (libdeflate), or None when not installed."""
    try:
        import deflate
    except ImportError:
        return None
    return deflate.zlib_decompress


def _plan(im: Image.Image, need_file: bool = True) -> tuple[int, int] | None:
    """(libspng format, bytes per pixel) when ``im`` is a still,
    non-interlaced 8-bit PNG in a mode we decode with libspng (opened from a
    file, unless not ``need_file``), else None."""
    if not isinstance(im, PngImagePlugin.PngImageFile) or im.custom_mimetype is not None:
        return None  # an APNG (acTL before the image data): Pillow's frame logic
    if getattr(im, "n_frames", 1) != 1 or len(im.tile) != 1 or (need_file and not im.filename):
        return None
    tile = im.tile[0]
    if tile.codec_name != "zip" or tile.extents != (0, 0, *im.size) or tile.args != im.mode:
        return None  # the raw mode names the bit depth: "RGB;16B", "RGBA;16B" are Pillow's
    if im.info.get("interlace"):
        return None
    return _PLANS.get(im.mode)


def load(im: Image.Image) -> Image.Image:
    """Load ``im`` (opened, not loaded) as ``im.load()`` would and return the
    loaded image: ``im`` itself, or a fresh Pillow decode of the same file
    when the fast path met anything it does not reproduce exactly (the caller
    closes ``im`` either way; a loaded single-frame PNG holds no file)."""
    plan = _plan(im)
    lib = _get_library() if plan is not None else None
    if lib is None or plan is None:
        im.load()
        return im
    fmt, depth = plan
    pixels = _decode_inflated(lib, im, fmt, depth)
    if pixels is None:
        try:
            pixels = lib.decode(im.filename, fmt, im.size, depth)  # type: ignore[attr-defined]
        except (SpngError, MemoryError):  # nothing of im touched yet
            im.load()
            return im
    try:
        _install(im, pixels, im.mode, depth)
        del pixels
        _walk(im)
        return im
    except Exception:
        pass
    pixels = None  # type: ignore[assignment]  # libspng's pixels go before Pillow decodes
    im.close()
    fresh = Image.open(im.filename, formats=("PNG",))  # type: ignore[attr-defined]
    try:
        fresh.load()  # Pillow's own outcome, error included
    except BaseException:
        fresh.close()
        raise
    return fresh


def _decode_inflated(lib: _Library, im: Image.Image, fmt: int, depth: int) -> bytearray | None:
    """libspng's pixels of ``im`` (a file _plan accepted) from its image data
    inflated by libdeflate and rewrapped in stored blocks (see the module
    docstring); None where that path does not apply (no ``deflate``, a small
    image, too little address space) or fails in any way: then the caller
    lets libspng read the file, and that outcome stands."""
    width, height = im.size
    raw = _raw_size(im.size, im.mode)
    if lib.inflate is None or not _MIN_INFLATED <= raw < 2**32:  # deflate takes the size as a C unsigned int
        return None
    try:
        with open(im.filename, "rb") as fh:  # type: ignore[attr-defined]
            size = os.fstat(fh.fileno()).st_size
            if not fits_in_address_space(_buffers(size, raw, width * height * depth)):
                return None  # the file path needs only the pixels' memory
            data = bytearray(size)
            if fh.readinto(data) != size:
                return None
        rows = _inflated_rows(lib.inflate, data, im.tile[0].offset, raw)
        del data  # before the rows grow into the stored PNG
        if rows is None:
            return None
        return lib.decode(_stored_png(im.size, im.mode, rows), fmt, im.size, depth, checked=True)
    except Exception:  # DeflateError, MemoryError, SpngError, OSError: the file path decides
        return None


def _buffers(file_size: int, raw: int, pixels: int) -> int:
    """The most memory _decode_inflated holds at once, in bytes: the file and
    the inflated rows, then the stored PNG (the rows, grown in place) and the
    pixels."""
    return max(file_size + raw, _stored_size(raw) + pixels)


def _raw_size(size: tuple[int, int], mode: str) -> int:
    """Bytes of filtered rows of an 8-bit, not interlaced PNG of ``size`` in ``mode``."""
    width, height = size
    return height * (1 + width * _CHANNELS[mode])


def _inflated_rows(inflate: Callable[[Any, int], bytearray], data: bytearray, offset: int, raw: int) -> bytearray | None:
    """The ``raw`` bytes of filtered rows of the PNG file in ``data``, whose
    image data Pillow found at ``offset``, inflated by ``inflate``
    (libdeflate); None when the image data does not inflate, with a valid
    checksum, to exactly that many bytes. ``data`` is spent (its image data
    chunks joined in place). Raises deflate.DeflateError, MemoryError."""
    length = _join_image_data(data, offset)
    if length is None:
        return None
    with memoryview(data) as view, view[:length] as compressed:
        rows = inflate(compressed, raw)  # libdeflate writes at most raw bytes and checks the adler32
    return rows if len(rows) == raw else None  # shorter: where Pillow's decoder stops decides


def _join_image_data(data: bytearray, offset: int) -> int | None:
    """Move what Pillow decodes of the PNG file in ``data`` to its start:
    the contents of the run of IDAT chunks that starts with the one whose
    contents start at ``offset``, up to the first other chunk or the end of
    the file. Returns its length; None when there is no IDAT chunk there,
    one runs past the end of the file, or there are more than
    MAX_SEGMENTS of them (a Python step each: 4 million empty chunks in a
    48 MB upload cost 1.7 s more here than libspng reading them in C)."""
    pos, joined = offset - 8, 0
    with memoryview(data) as view:
        for _ in range(MAX_SEGMENTS + 1):
            if pos + 8 > len(data):
                break
            length, cid = struct.unpack_from(">I4s", data, pos)
            if cid != b"IDAT":
                break
            start = pos + 8
            if start + length > len(data):
                return None  # cut inside the image data: where Pillow's decoder stops decides
            view[joined:joined + length] = view[start:start + length]  # memmove: the target is never ahead
            joined += length
            pos = start + length + 4  # past the CRC, which Pillow does not check for image data either
        else:
            return None  # real encoders write chunks of 8 KB and more: libspng reads this file
    return joined if pos > offset - 8 else None


def _stored_size(raw: int) -> int:
    """Bytes of the stored PNG of ``raw`` bytes of filtered rows."""
    blocks = -(-raw // _STORED)
    chunks = -(-blocks // _BLOCKS_PER_CHUNK)
    return 8 + 25 + 12 * chunks + 2 + 5 * blocks + raw + 4 + 12


def _stored_png(size: tuple[int, int], mode: str, raw: bytearray) -> bytearray:
    """``raw`` (filtered rows) made a PNG in place: the IHDR as Pillow reads
    the file (``size``, 8-bit ``mode``, not interlaced), the rows in stored
    deflate blocks (libspng copies them instead of inflating them again) in
    IDAT chunks of under 1 GiB, and IEND. The IDAT CRCs and the zlib checksum
    are left zero: decode(checked=True) reads neither."""
    total = len(raw)
    raw.extend(bytes(_stored_size(total) - total))  # realloc: no second copy of the rows at any time
    moves = []  # (block start in raw, its place in the PNG, its length)
    headers = []  # (place in the PNG, bytes): written once every block has moved
    at = 8 + 25
    for first in range(0, total, _STORED * _BLOCKS_PER_CHUNK):
        last = min(total, first + _STORED * _BLOCKS_PER_CHUNK)
        chunk_at, at = at, at + 8
        if first == 0:
            at += 2  # the zlib header
        for start in range(first, last, _STORED):
            length = min(_STORED, total - start)
            headers.append((at, struct.pack("<BHH", start + length == total, length, length ^ 0xFFFF)))
            moves.append((start, at + 5, length))
            at += 5 + length
        if last == total:
            at += 4  # the adler32, zero
        headers.append((chunk_at, struct.pack(">I4s", at - chunk_at - 8, b"IDAT")))
        at += 4  # the CRC, zero
    with memoryview(raw) as view:
        for start, place, length in reversed(moves):  # the last block moves furthest: nothing unmoved is hit
            view[place:place + length] = view[start:start + length]
        for place, header in headers:
            view[place:place + len(header)] = header
        view[:33] = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", *size, 8, _COLOUR_TYPES[mode], 0, 0, 0))
        view[41:43] = b"\x78\x01"  # zlib header: deflate, 32K window, no dictionary
        view[-12:] = _chunk(b"IEND", b"")
    return raw


def _chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))


def _install(im: Image.Image, pixels: bytearray, mode: str, depth: int) -> None:
    """Make ``pixels`` ``im``'s image memory (no copy: Pillow maps it)."""
    im.im = Image.core.map_buffer(pixels, im.size, "raw", 0, (mode, im.size[0] * depth, 1))


def _walk(im: Image.Image) -> None:
    """Pillow's load() with the skip decoder: Pillow reads the image data
    chunks and then the chunks after them (PngImageFile.load_end) as it does
    when it decodes, into the memory _install gave it."""
    read = im.load_read  # type: ignore[attr-defined]
    end = _End()

    def until_image_data_ends(size: int) -> bytes:
        # Pillow's reader returns b"" after the last image data chunk (a
        # decoder still asking for data then means a truncated file); the
        # skip decoder has nothing left to finish, so it ends there.
        data = read(size)
        if not data:
            if not im.png.queue:  # type: ignore[attr-defined]
                # not the chunk after the image data, pushed back: the file
                # ends inside an image data chunk. Pillow's outcome depends
                # on where its decoder stopped: let it decode (load's fallback).
                raise EOFError("the file ends inside the image data")
            end.ended = True
            return b"\0"
        return data

    im.tile = [im.tile[0]._replace(codec_name=_SKIP, args=(end,))]
    im.load_read = until_image_data_ends  # type: ignore[attr-defined]
    try:
        im.load()
    finally:
        del im.load_read  # type: ignore[attr-defined]
