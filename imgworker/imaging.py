"""The image pipeline: pure Pillow work, no queue, HTTP or database.

Contract:
- :func:`probe` identifies a file by its bytes against the allow-list and
  checks dimensions, frame count and frames x canvas against the limits from
  the header alone, before any pixel is decoded.
- :func:`process` decodes (JPEG at reduced scale when the target is smaller),
  applies EXIF orientation, converts to sRGB when an ICC profile is present,
  fits within the limits keeping the aspect ratio (never upscaling), strips
  metadata, encodes, and writes ``processed_<jobId>.<ext>`` atomically. It
  returns a typed :class:`~imgworker.model.Outcome` (the API alone turns it
  into the public JSON).
- Every failure is an :class:`ImageError` with a code; deterministic ones
  (UNSUPPORTED_FORMAT, INVALID_IMAGE, IMAGE_TOO_LARGE) are never transient,
  and a decode error is never retried (a second load() of a broken stream can
  "succeed" with a partial image).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageCms, ImageFile, ImageSequence
# Our formats' plugins, imported by name: Image.open(formats=("MPO",...)) or a
# save as WEBP would otherwise make Pillow import all its ~40 plugins (30 ms
# of CPU in every worker and every `imgworker process --local`).
from PIL import GifImagePlugin, JpegImagePlugin, MpoImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

try:
    from PIL import AvifImagePlugin  # (Pillow >= 11.2)

    # One decoder thread, as for the AVIF encoder and HEIC (decode_threads=1):
    # the pool's workers are the parallelism. Pillow's default is a thread
    # per core, so one AVIF upload would take every core from the other jobs
    # (and the API), and its work would run outside the worker's main thread,
    # whose CPU wait is what the supervisor credits against JOB_TIMEOUT_MS.
    AvifImagePlugin.DEFAULT_MAX_THREADS = 1
except ImportError:  # pragma: no cover - older Pillow: Image.init() finds what there is
    pass

try:  # fast_image_resize (Rust, SIMD); see _resize
    from cykooz_resizer import AlphaMulDiv as _AlphaMulDiv
    from cykooz_resizer import FilterType, ResizeAlg, ResizeOptions
    from cykooz_resizer import Resizer as _FastResizer

    _FAST_OPTIONS = ResizeOptions(resize_alg=ResizeAlg.convolution(FilterType.lanczos3))
except ImportError:  # pragma: no cover - Pillow's resize
    _FastResizer = None

from . import formats
from .errors import ImageError, OutOfMemory
from .probe import Header, check_animation, check_pixels, inspect, sniff  # noqa: F401  (sniff, Header: API)
from .strip import strip
from .limits import Limits, fits_in_address_space
from .model import Outcome, output_filename

_heif_opener: list[bool] = []  # registered in this process


def _register_heif() -> None:
    """Register pillow-heif's opener (the optional extra imgworker[heif]) at
    the first HEIC job, not at import: most workers never see one."""
    if _heif_opener:
        return
    try:
        import pillow_heif
    except Exception as exc:  # listed by find_spec, but broken
        raise ImageError("UNSUPPORTED_FORMAT", f"HEIC/HEIF input is not available: {formats.MISSING_HINT['heic']}",
                         detail=_why(exc)) from None
    # Only the primary picture is ever decoded (no thumbnails, depth maps or
    # other auxiliary pictures); 10/12-bit HEIC comes out as 8-bit.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)
    _heif_opener.append(True)

# Pillow plugin names allowed for each of our format names. A camera MPO is a
# JPEG with a second picture appended; we treat it as JPEG.
PIL_FORMATS = {"jpeg": ("JPEG", "MPO"), "png": ("PNG",), "webp": ("WEBP",), "gif": ("GIF",), "avif": ("AVIF",),
               "heic": ("HEIF",)}
CAN_ANIMATE = ("webp", "gif", "avif")
MULTI_FRAME_INPUTS = ("gif", "webp", "png", "avif")
ANIMATED_AVIF_MIN_SPEED = 8  # a HEIC's extra top-level pictures are not frames

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass
class Probe:
    """What the header says. ``width``/``height`` are as displayed (after
    EXIF orientation)."""

    format: str
    width: int
    height: int
    frames: int = 1
    orientation: int = 1
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    within_frame_limit: bool = True
    alpha: bool = False
    # a DCT JPEG, which libjpeg can decode at a reduced scale (a lossless
    # one decodes only at full size: libjpeg refuses a scale for it)
    dct_scalable: bool = False

    @property
    def animated(self) -> bool:
        """Whether the output keeps every frame (when its format can animate).
        Over MAX_FRAMES only the first frame is decoded: the frame count is
        known from the header, so a frame bomb costs nothing."""
        return self.frames > 1 and self.format in MULTI_FRAME_INPUTS and self.within_frame_limit


def _orientation(im: Image.Image) -> int:
    """EXIF (or XMP tiff:Orientation) value, read from the header only.

    The base-class getexif() is used on purpose: PNG's override calls load()
    to look for an eXIf chunk after the image data, and catching a failed
    load() here would let a later load() "succeed" on a broken stream."""
    try:
        value = Image.Image.getexif(im).get(0x0112, 1)
        return value if value in _TRANSPOSE else 1
    except Exception:  # a broken EXIF block must not sink a good picture
        return 1


def _open(path: Path, limits: Limits) -> tuple[Image.Image, Probe]:
    """Check ``path``'s structure against every limit (probe.inspect: nothing
    decoded or inflated), then open it with only its plugin and make sure
    Pillow sees the picture that was checked. The caller owns (and must
    close) the returned image."""
    header = inspect(path, limits)
    kind = header.format
    Image.MAX_IMAGE_PIXELS = limits.max_input_pixels  # Pillow refuses at 2x; the probe checked at 1x
    if kind == "heic":
        _register_heif()
    try:
        im = Image.open(path, formats=PIL_FORMATS[kind])
    except Image.DecompressionBombError:
        raise ImageError("IMAGE_TOO_LARGE", f"The image exceeds {limits.max_input_pixels:,} pixels") from None
    except Exception as exc:
        raise ImageError("INVALID_IMAGE", f"The {kind.upper()} file is corrupt or truncated",
                         detail=_why(exc)) from None
    try:
        width, height = im.size
        frames = header.frames  # counted up to MAX_FRAMES + 1; never Pillow's n_frames, which walks them all
        if kind in ("jpeg", "png", "gif", "webp"):
            # A parser differential would let Pillow decode a picture the probe
            # never checked. GIF: Pillow's canvas grows frame by frame up to the
            # probe's, which already includes every frame's extent.
            if (width, height) != (header.width, header.height) and not (
                    kind == "gif" and width <= header.width and height <= header.height):
                raise ImageError("INVALID_IMAGE", f"The {kind.upper()} file declares {header.width}x{header.height} "
                                                  f"but decodes as {width}x{height}")
            width, height = header.width, header.height
        else:  # HEIF family: isobmff checked the items; the decoder reports the turned size
            check_pixels(width, height, limits)
            if kind in MULTI_FRAME_INPUTS:
                frames = int(getattr(im, "n_frames", 1) or 1)
                check_animation(kind, frames, width, height, limits)
                im.seek(0)
        orientation = _orientation(im)
        if orientation >= 5:
            width, height = height, width
        alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
        return im, Probe(kind, width, height, frames, orientation, dict(im.info), frames <= limits.max_frames,
                         alpha=alpha, dct_scalable=kind == "jpeg" and not header.lossless_jpeg)
    except ImageError:
        im.close()
        raise
    except Exception as exc:
        im.close()
        raise ImageError("INVALID_IMAGE", f"The {kind.upper()} file is corrupt", detail=_why(exc)) from None


def probe(path: Path | str, limits: Limits) -> Probe:
    """The upload check: identify a file and check it against every limit
    from its structure alone, bounded in time and memory (probe.inspect; no
    decoder runs, nothing is inflated). The orientation is not read here:
    ``width``/``height`` are as stored. Raises ImageError."""
    header = inspect(path, limits)
    return Probe(header.format, header.width, header.height, header.frames,
                 within_frame_limit=header.frames <= limits.max_frames, alpha=header.alpha)


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fit(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """Largest size within the box keeping the aspect ratio; never larger than the input."""
    scale = min(1.0, box_w / width, box_h / height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _normalize_mode(im: Image.Image) -> Image.Image:
    """RGB, RGBA, L or CMYK, ready to resize: palette, 16-bit, 1-bit,
    grey+alpha and transparency keys handled."""
    if im.mode.startswith("I") or im.mode == "F":
        lo, hi = im.getextrema()
        if hi > 255:  # real 16-bit data: scale instead of clipping
            im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if im.mode == "P":
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif im.mode not in ("RGB", "RGBA", "L", "CMYK"):
        im = im.convert("RGBA" if has_alpha else ("L" if im.mode in ("1", "I", "I;16", "F") else "RGB"))
    elif has_alpha and im.mode in ("RGB", "L"):
        im = im.convert("RGBA")
    return im


def _drop_opaque_alpha(im: Image.Image) -> Image.Image:
    """RGB for an RGBA image whose alpha is 255 everywhere: it changes no
    pixel, and an encoder would spend time (and bytes) on it. Done after
    resizing, where it costs 1 ms instead of 25 on a 3640x2400 PNG."""
    if im.mode == "RGBA" and im.im.getband(3).getextrema()[0] == 255:
        return im.convert("RGB")
    return im


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Apply the embedded ICC profile (CMYK included) into sRGB; RGB/RGBA/L out."""
    if icc:
        transform = _srgb_transform(icc, im.mode)
        if transform is not None:
            im = ImageCms.applyTransform(im, transform)
    return im.convert("RGB") if im.mode == "CMYK" else im


# Transforms by (profile digest, mode); None: the profile is sRGB in effect.
# Most photos carry one of a handful of profiles (sRGB IEC61966-2.1, Display
# P3, a camera's), and building a transform costs 2-3 ms per image.
_TRANSFORMS: dict[tuple[bytes, str], Any] = {}
_TRANSFORMS_MAX = 32
# What a profile must map to within one level of itself to count as sRGB:
# a 17-level grid (17^3 colours: pins down the 3x3 matrix) and every level of
# each channel alone and of grey (a profile's curves are tables of up to 4096
# entries, so a curve may leave sRGB's between grid levels).
_LEVELS = [min(i * 16, 255) for i in range(17)]
_GRID = Image.frombytes("RGB", (17 ** 3 + 4 * 256, 1), bytes(
    [v for r in _LEVELS for g in _LEVELS for b in _LEVELS for v in (r, g, b)]
    + [v for level in range(256) for ramp in ((level, 0, 0), (0, level, 0), (0, 0, level), (level,) * 3)
       for v in ramp]))


def _has_lookup_table(icc: bytes) -> bool:
    """Whether ``icc`` has an A2B or D2B tag: lcms then uses that table (a
    grid of any spacing behind curves) instead of the matrix and curves, and
    a table may differ from sRGB anywhere between the colours we check."""
    count = int.from_bytes(icc[128:132], "big")
    table = icc[132:132 + 12 * count]
    return any(table[i:i + 3] in (b"A2B", b"D2B") for i in range(0, len(table), 12))


def _srgb_transform(icc: bytes, mode: str) -> Any:
    """The lcms transform from ``icc`` to sRGB for an image of ``mode``, or
    None when there is nothing to do: a broken or mismatched profile (the
    picture is then used as stored), or a matrix/TRC RGB profile that maps a
    17-level grid and every level of each channel to within one level of
    itself, i.e. sRGB under another name (applying it would cost 12 ms per
    megapixel for nothing). A profile with a lookup table is always applied."""
    key = (hashlib.sha256(icc).digest(), mode)
    if key in _TRANSFORMS:
        return _TRANSFORMS[key]
    transform = None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        transform = ImageCms.buildTransform(src, _SRGB, mode, out_mode)
        if mode in ("RGB", "RGBA") and not _has_lookup_table(icc):
            grid = _GRID if mode == "RGB" else _GRID.convert("RGBA")
            if _max_difference(ImageCms.applyTransform(grid, transform).convert("RGB"), _GRID) <= 1:
                transform = None
    except Exception:  # broken or mismatched profile: fall back to a plain conversion
        transform = None
    if len(_TRANSFORMS) >= _TRANSFORMS_MAX:
        _TRANSFORMS.pop(next(iter(_TRANSFORMS)))
    _TRANSFORMS[key] = transform
    return transform


# JPEG shrink-on-load: libjpeg-turbo's DCT scaling (1/2, 1/4, 1/8) to the
# smallest scale that still covers _DRAFT_GAP x the fitted size, then LANCZOS.
# Measured per photo (SSIM against a float reference, CPU per job; README,
# `pipeline_bench.py --variants 2,1.5,1`): a gap of 1.5 decodes a 3840 px
# photo for a 1024 box at 1/2 as sharp does, 89 -> 58 ms (baseline JPEG) and
# 278 -> 256 ms (progressive), but its SSIM drops from 0.9287 to 0.9262
# (sharp's); a gap of 1 also takes a 5640 px photo to 1/4 (0.9281 -> 0.9147).
# Issue 11 keeps only what wins without losing quality, so 2 stays. libjpeg's
# 3/8 scale (reachable with scale_denom 3) gained 1.6 % for 0.0002.
_DRAFT_GAP = 2
_REDUCING_GAP = 2.0  # Pillow's resize only (the fallback): see _resize


def _resize(frame: Image.Image, size: tuple[int, int], owned: bool = False) -> Image.Image:
    """LANCZOS (a=3) to ``size`` over the whole input, an alpha channel
    premultiplied (no dark fringes). fast_image_resize does it with SIMD, 9-15x
    faster than Pillow and within a level or two of it on photos (up to ~20 at
    hard edges: it runs the passes in the other order); Pillow's resize (a box
    reduce() leaving _REDUCING_GAP, then LANCZOS) is the fallback.

    ``owned``: the caller gives ``frame``'s pixels away (nothing reads them
    afterwards), so an RGBA frame may be premultiplied where it lies instead
    of in a copy; a frame that is not owned is never changed."""
    if frame.size == size:
        return frame
    resizer = _fast_resizer()
    if resizer is not None and frame.mode in _FAST_MODES:
        # Rust aborts the process on a failed allocation: see limits.fits_in_address_space
        if fits_in_address_space(_fast_buffers(frame, size, owned)):
            return _fast_resize(resizer, frame, size, owned)
    return frame.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def _fast_resize(resizer: Any, frame: Image.Image, size: tuple[int, int], owned: bool) -> Image.Image:
    """fast_image_resize's LANCZOS3 of ``frame`` (a mode in _FAST_MODES) to
    ``size``. RGBA goes premultiplied: its colour channels are multiplied by
    alpha in place (in ``frame`` when owned, else in a copy), the four
    channels resized as plain data (Pillow's RGBa) and the small result
    divided back. Given an RGBA image, resize_pil does the same but into a
    premultiplied copy of the whole input it allocates itself: 35 MB of
    fresh pages for a 3640x2400 PNG, 31 ms of CPU where this takes 12, with
    the same pixels (and a Rust allocation that a memory cap would turn into
    an abort, where Pillow's copy raises MemoryError)."""
    if frame.mode != "RGBA":
        out = Image.new(frame.mode, size, None)  # None: not filled, the resizer writes every pixel
        # A Resizer per call: one keeps its largest buffers (its intermediate)
        # to itself; freed, they go back to the allocator for the next job.
        resizer().resize_pil(frame, out, _FAST_OPTIONS)
        return out
    src = frame if owned else frame.copy()
    alpha = _AlphaMulDiv()
    alpha.multiply_alpha_pil_inplace(src)  # mode RGBa from here on (a read-only image is copied first)
    out = Image.new("RGBa", size, None)
    resizer().resize_pil(src, out, _FAST_OPTIONS)  # RGBa to RGBa: no alpha handling of its own
    alpha.divide_alpha_pil_inplace(out)  # mode RGBA
    return out


def _fast_buffers(frame: Image.Image, size: tuple[int, int], owned: bool = False) -> int:
    """Bytes the fast path allocates to resize ``frame`` to ``size``
    (measured with VmPeak): the intermediate of fast_image_resize's vertical
    pass, input width x output height at Pillow's 4 bytes a pixel (1 for L),
    plus its coefficients; for an RGBA frame that is not owned (or is
    read-only), the copy that gets premultiplied. The output is Pillow's."""
    depth = 1 if frame.mode == "L" else 4
    width, height = frame.size
    need = width * size[1] * depth + (width + height) * 1024
    if frame.mode == "RGBA" and (not owned or frame.readonly):
        need += width * height * 4
    return need


_FAST_MODES = ("RGB", "RGBA", "L", "CMYK")
_fast: list = []  # [the Resizer class or None], decided once per process


def _fast_resizer() -> Any:
    """cykooz.resizer's Resizer class once it has shown, on a small test card
    in each mode we use, that it gives Pillow's result (it reads Pillow's
    image memory directly, so a layout it does not know must not reach a
    job); None when it is missing or disagrees."""
    if not _fast:
        _fast.append(_checked_resizer())
    return _fast[0]


def _max_difference(a: Image.Image, b: Image.Image) -> int:
    """The largest difference of any pixel in any band."""
    extrema = ImageChops.difference(a, b).getextrema()
    return max(high for _, high in extrema) if isinstance(extrema[0], tuple) else extrema[1]


def _on_white(im: Image.Image) -> Image.Image:
    """An RGBA image flattened on white."""
    flat = Image.new("RGB", im.size, (255, 255, 255))
    flat.paste(im, mask=im.getchannel("A"))
    return flat


def _checked_resizer() -> Any:
    """The Resizer class when _fast_resize, the very path jobs take (for
    RGBA: alpha multiplied in place, RGBa resized, divided back), gives
    Pillow's LANCZOS within 2 levels on a test card in each mode (RGBA: what
    shows on white, and the alpha itself); None otherwise."""
    if _FastResizer is None:
        return None
    try:
        card = Image.linear_gradient("L").resize((97, 61)).convert("RGB")
        card.paste((200, 30, 60), (10, 10, 40, 30))
        for mode in _FAST_MODES:
            src = card.convert(mode)
            if mode == "RGBA":
                src.putalpha(Image.linear_gradient("L").resize((97, 61)).point(lambda v: min(255, v + 40)))
            want = src.resize((31, 19), Image.Resampling.LANCZOS)
            out = _fast_resize(_FastResizer, src, (31, 19), owned=True)
            if out.mode != want.mode or out.size != want.size:
                return None
            if mode == "RGBA":  # colours under a low alpha differ by rounding; compare what shows
                if _max_difference(out.getchannel("A"), want.getchannel("A")) > 2:
                    return None
                out, want = _on_white(out), _on_white(want)
            if _max_difference(out, want) > 2:
                return None
        return _FastResizer
    except Exception:  # pragma: no cover - an incompatible build: Pillow's resize
        return None


def _prepare_frame(frame: Image.Image, size: tuple[int, int], orientation: int,
                   owned: bool = False) -> Image.Image:
    """Normalise, resize to ``size`` (stored orientation), colour-manage on
    the small image, then turn upright. ``owned``: nothing reads ``frame``'s
    pixels afterwards, so resizing may work in them (see _resize); an
    animation's frames are not owned (the decoder draws the next frame over
    this one)."""
    icc = frame.info.get("icc_profile")
    normalized = _normalize_mode(frame)
    frame = _to_srgb(_drop_opaque_alpha(_resize(normalized, size, owned or normalized is not frame)), icc)
    if orientation in _TRANSPOSE:
        frame = frame.transpose(_TRANSPOSE[orientation])
    return frame


def _encode(frames: list[Image.Image], durations: list[int], loop: int, fmt: str, quality: int,
            avif_speed: int = 6) -> bytes:
    buf = io.BytesIO()
    first = frames[0]
    first.info = {}  # never carry EXIF/XMP/ICC/comments into the output
    if fmt == "jpeg":
        if first.mode in ("RGBA", "LA"):
            first = _on_white(first)
        elif first.mode not in ("RGB", "L"):
            first = first.convert("RGB")
        first.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
    elif fmt == "png":
        first.save(buf, "PNG", optimize=False, compress_level=6)
    elif fmt == "webp":
        frames = [f if f.mode in ("RGB", "RGBA") else f.convert("RGBA" if "A" in f.mode else "RGB") for f in frames]
        if len(frames) > 1:
            frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=durations,
                           loop=loop, quality=quality, method=4)
        else:
            frames[0].save(buf, "WEBP", quality=quality, method=4)
    elif fmt == "avif":
        frames = [f if f.mode in ("RGB", "RGBA") else f.convert("RGBA" if "A" in f.mode else "RGB") for f in frames]
        # One encoder thread: the worker pool already keeps every core busy.
        # An animation encodes at speed 8 or faster: each frame costs what a
        # still does, and up to MAX_FRAMES of them must fit in JOB_TIMEOUT_MS.
        speed = max(avif_speed, ANIMATED_AVIF_MIN_SPEED) if len(frames) > 1 else avif_speed
        options = dict(quality=formats.avif_quality(quality), speed=speed, max_threads=1)
        if len(frames) > 1:
            frames[0].save(buf, "AVIF", save_all=True, append_images=frames[1:], duration=durations, loop=loop,
                           **options)
        else:
            frames[0].save(buf, "AVIF", **options)
    elif fmt == "gif":
        if len(frames) > 1:
            frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=durations,
                           loop=loop, disposal=2, optimize=False)
        else:
            first.save(buf, "GIF", optimize=False)
    else:  # pragma: no cover - options are validated upstream
        raise ImageError("INVALID_IMAGE", f"Unknown output format {fmt}")
    return buf.getvalue()


def _decode_frames(im: Image.Image, probe_: Probe, size: tuple[int, int], animate: bool, limits: Limits):
    """Decode the frames we keep, at ``size`` (displayed orientation)."""
    oriented_box = size if probe_.orientation < 5 else (size[1], size[0])
    if not animate:
        if oriented_box != im.size and probe_.dct_scalable:
            im.draft(None, (round(oriented_box[0] * _DRAFT_GAP), round(oriented_box[1] * _DRAFT_GAP)))
        im = _load_still(im)
        # owned: a still is decoded once, and only this call reads its pixels
        frame = _prepare_frame(im, oriented_box, probe_.orientation, owned=True)
        if frame is not im:
            im.close()  # the full-size pixels go before encoding, not after it: a lower peak
        return [frame], [], 0
    frames, durations = [], []
    for index, frame in enumerate(ImageSequence.Iterator(im)):
        if index >= limits.max_frames:
            raise ImageError("IMAGE_TOO_LARGE", f"The animation has more than {limits.max_frames} frames")
        frame.load()
        durations.append(int(frame.info.get("duration", 100) or 100))
        prepared = _prepare_frame(frame, oriented_box, probe_.orientation)
        # the iterator reuses one image object: keep a copy only if nothing made a new one
        frames.append(prepared.copy() if prepared is frame else prepared)
    return frames, durations, int(im.info.get("loop", 0) or 0)


def _load_still(im: Image.Image) -> Image.Image:
    """``im`` loaded, as im.load() does; a PNG's pixels come from libspng
    where it gives Pillow's pixels faster (imgworker.spng, which may return a
    fresh Pillow decode of the file instead of ``im``: use the result)."""
    if im.format == "PNG":
        from . import spng  # at the first PNG job: other workers never load ctypes and libspng

        return spng.load(im)
    im.load()
    return im


def output_format(requested: str, info: Probe, accept: str | None = None) -> str:
    """The concrete output format: "original" keeps the input's (a HEIC
    becomes JPEG, or PNG with alpha: browsers do not show HEIC); "auto"
    follows ``accept`` (see formats.negotiate)."""
    if requested == "auto":
        return formats.negotiate(accept, info.alpha, info.animated)
    if requested == "original":
        if info.format == "heic":
            return "png" if info.alpha else "jpeg"
        return info.format
    return requested



def process(src: Path | str, out_dir: Path | str, job_id: str, options: dict[str, Any], limits: Limits) -> Outcome:
    """Run the whole pipeline on ``src``; write ``out_dir/processed_<job_id>.<ext>``.

    ``options``: format (webp|jpeg|png|original), quality (1-100), maxWidth,
    maxHeight (capped by the limits). Returns the typed outcome (views.py
    turns it into the public JSON).
    """
    started = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    try:
        input_size = src.stat().st_size
    except OSError as exc:
        raise ImageError("IO_ERROR", "The upload could not be read on the server", transient=True,
                         detail=_why(exc)) from None
    box_w = min(int(options.get("maxWidth") or limits.max_width), limits.max_width)
    box_h = min(int(options.get("maxHeight") or limits.max_height), limits.max_height)
    quality = int(options.get("quality") or limits.quality)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im, info = _open(src, limits)
        try:
            fmt = options.get("format") or limits.output_format
            fmt = output_format(fmt, info, options.get("accept"))
            size = fit(info.width, info.height, box_w, box_h)
            animate = info.animated and fmt in CAN_ANIMATE
            try:
                frames, durations, loop = _decode_frames(im, info, size, animate, limits)
            except ImageError:
                raise
            except Image.DecompressionBombError:
                raise ImageError("IMAGE_TOO_LARGE", "A frame of the image exceeds the pixel limit") from None
            except MemoryError:
                raise OutOfMemory("The image needs more memory than the worker has") from None
            except Exception as exc:
                raise ImageError("INVALID_IMAGE", f"The {info.format.upper()} file is corrupt or truncated",
                                 detail=_why(exc)) from None
            try:
                data = _encode(frames, durations, loop, fmt, quality, limits.avif_speed)
            except ImageError:
                raise
            except Exception as exc:
                if not _out_of_memory(exc, frames[0].width * frames[0].height):
                    raise  # a bug, not the image's fault
                raise OutOfMemory("Encoding the image needs more memory than the worker has") from None
            out_w, out_h = frames[0].size
            resized = (out_w, out_h) != (info.width, info.height)
            kept_original = False
            if not resized and fmt == info.format and (animate or not info.animated):
                # before im.close(): a frame may be the opened image itself
                smaller = _stripped_original(src, info)
                if smaller is not None and len(smaller) < len(data) and _same_pixels(smaller, info.format, frames):
                    data, kept_original = smaller, True
        finally:
            im.close()
    write_atomic(out_dir / output_filename(job_id, fmt), data)
    return Outcome(
        processing_ms=round((time.perf_counter() - started) * 1000),
        input_format=info.format, input_size=input_size, input_width=info.width, input_height=info.height,
        output_format=fmt, output_size=len(data), output_width=out_w, output_height=out_h,
        frames_in=info.frames, frames_out=len(frames), animated=animate, kept_original=kept_original,
    )


def _out_of_memory(exc: Exception, pixels: int) -> bool:
    """Whether an encoder's failure on a picture of ``pixels`` pixels is the
    worker's memory running out. Python and Pillow raise MemoryError; the
    codecs report a failed allocation in their own words (libwebp "encoding
    error 1", Pillow's GIF quantizer "quantization error", libjpeg "broken
    data stream"), which would read as a server error. Encoding a picture
    we decoded fails for no other reason than memory or a bug, so it counts
    as memory when 8 bytes a pixel (what the encoders take, measured) would
    not fit under the worker's address-space cap now."""
    return isinstance(exc, MemoryError) or not fits_in_address_space(pixels * _ENCODER_BYTES_PER_PIXEL)


_ENCODER_BYTES_PER_PIXEL = 8


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + rename,
    so readers never see a partial file; fsync so it survives a power cut."""
    tmp = None
    try:
        # ".tmp-<name>." lets the supervisor find the half-written file of a worker it had to kill.
        # Inside the try: an unwritable directory (read-only, permissions, no inodes) is an
        # I/O error like a failed write, transient, not a bug in the pipeline.
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            if tmp is not None:
                os.unlink(tmp)
        except OSError:
            pass
        raise ImageError("IO_ERROR", "The result could not be written on the server", transient=True,
                         detail=_why(exc)) from None


# --- "never make an image worse for nothing": lossless metadata stripping ---

def _stripped_original(src: Path, info: Probe) -> bytes | None:
    """The input re-emitted without metadata (strip.py walks its whole
    structure), when the result displays the same as what we would encode
    (upright, no colour profile). None otherwise."""
    if info.orientation != 1 or info.info.get("icc_profile"):
        return None
    try:
        return strip(src.read_bytes(), info.format)
    except (OSError, MemoryError):  # an optimisation: the re-encoded picture is already in hand
        return None


def _same_pixels(data: bytes, fmt: str, frames: list[Image.Image]) -> bool:
    """Whether ``data`` decodes (with the plugin of ``fmt`` only) to exactly
    the frames we would have encoded: the stripped file is kept only then."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS[fmt]) as im:
                count = 0
                for count, got in enumerate(ImageSequence.Iterator(im), 1):  # one object, moved frame by frame
                    if count > len(frames):
                        return False
                    got.load()
                    got, want = _drop_opaque_alpha(_normalize_mode(got)), frames[count - 1]
                    if got.size != want.size or got.mode != want.mode or ImageChops.difference(got, want).getbbox():
                        return False
                    if len(frames) == 1:
                        break  # a still: only the first frame was kept
                return count == len(frames)
    except Exception:  # anything odd about the stripped file: re-encode instead
        return False


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a partial picture
