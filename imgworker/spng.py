"""libspng for the pixel decode of still 8-bit PNGs: the same pixels as
Pillow's own PNG decoder for a quarter less CPU on big RGB/RGBA images (its
unfilter is scalar C, libspng's is SIMD; see the README, "Dependencies").

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
- Once per process, before the first use, libspng decodes a small PNG of
  each mode and must give Pillow's pixels; a missing or incompatible pyspng
  (another libspng ABI, symbols not exported) leaves Pillow doing everything.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, PngImagePlugin

# libspng 0.7's enum values (spng.h)
_FMT_RGBA8 = 1
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
                ("spng_set_png_buffer", i, [p, ctypes.c_char_p, size_t]),
                ("spng_set_chunk_limits", i, [p, size_t, size_t]),
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

    def decode(self, source: str | bytes, fmt: int, size: tuple[int, int], depth: int) -> bytearray:
        """The pixels of the PNG file at path ``source`` (or of the PNG
        ``bytes``) in ``fmt``: ``size[1]`` rows of ``size[0] * depth`` bytes.
        Raises SpngError, or MemoryError for our buffer."""
        ctx = self.ctx_new(0)
        if not ctx:
            raise SpngError("spng_ctx_new failed")
        fh = None
        try:
            self._check(self.set_chunk_limits(ctx, _CHUNK_LIMIT, _CHUNK_LIMIT))
            if isinstance(source, bytes):
                self._check(self.set_png_buffer(ctx, source, len(source)))
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
    Pillow's pixels; None when pyspng is missing, is another libspng (0.7 is
    the ABI declared above) or disagrees."""
    try:
        path = _extension_path()
        if path is None:
            return None
        lib = _Library(path)
        if not lib.version.startswith("0.7."):
            return None
        Image.register_decoder(_SKIP, _SkipDecoder)
        card = Image.linear_gradient("L").resize((37, 23)).convert("RGB")
        card.paste((200, 30, 60), (5, 5, 20, 15))
        for mode in _PLANS:
            src = card.convert(mode)
            if mode == "RGBA":
                src.putalpha(Image.linear_gradient("L").resize((37, 23)))
            buf = io.BytesIO()
            src.save(buf, "PNG", compress_level=1)
            with Image.open(io.BytesIO(buf.getvalue()), formats=("PNG",)) as want, \
                    Image.open(io.BytesIO(buf.getvalue()), formats=("PNG",)) as got:
                want.load()
                fmt, depth = _PLANS[mode]
                if _plan(got, need_file=False) != (fmt, depth):
                    return None
                _install(got, lib.decode(buf.getvalue(), fmt, got.size, depth), mode, depth)
                _walk(got)
                if got.mode != want.mode or got.tobytes() != want.tobytes():
                    return None
        return lib
    except Exception:  # an incompatible build: Pillow does every decode
        return None


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
