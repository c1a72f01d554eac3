"""Which image formats this install reads and writes, and how a client's
``Accept`` header picks one (``format=auto``). Pure: no HTTP, queue or DB.

Contract:
- :data:`READABLE` / :data:`WRITABLE` are the formats whose codec is present
  in this process (AVIF comes with Pillow's own plugin when its libavif is
  built in; HEIC/HEIF needs the optional ``pillow-heif``, ``imgworker[heif]``).
  A format missing here is refused at start-up by the settings, never found
  missing halfway through a job.
- :func:`negotiate` turns an ``Accept`` header into the best output format:
  AVIF, then WebP, then JPEG; PNG for an image with alpha (and GIF for an
  animation) when the client takes neither AVIF nor WebP. An animation
  prefers WebP to AVIF: every AVIF frame costs what a still does. Only an explicit
  ``image/avif`` / ``image/webp`` counts: ``*/*`` (curl, fetch) says nothing
  about what the eventual viewer decodes, so it gets the universal formats.
- :func:`avif_quality` maps our 1-100 quality scale (WebP's) to libavif's.
"""

from __future__ import annotations

import importlib.util

import re
from bisect import bisect_left

from PIL import features

BASE_FORMATS = ("jpeg", "png", "webp", "gif")


def _has_avif() -> bool:
    try:
        return bool(features.check("avif"))
    except Exception:  # an old Pillow without the feature name
        return False


def _has_heif() -> bool:
    # Whether the optional extra imgworker[heif] is installed, without
    # importing it: libheif costs 5 MB of RSS and 7 ms in every process that
    # reads the settings (API, supervisor, every worker); imaging imports it
    # at the first HEIC job.
    try:
        return importlib.util.find_spec("pillow_heif") is not None
    except Exception:
        return False


HAS_AVIF = _has_avif()
HAS_HEIF = _has_heif()

# Every input format name we know, and the ones this process can decode.
KNOWN_INPUTS = BASE_FORMATS + ("avif", "heic")
READABLE = BASE_FORMATS + (("avif",) if HAS_AVIF else ()) + (("heic",) if HAS_HEIF else ())
# Output formats: "original" keeps the input's format (HEIC is written as
# JPEG: pillow-heif's encoder is not something browsers display).
WRITABLE = ("webp", "jpeg", "png") + (("avif",) if HAS_AVIF else ())
OUTPUT_CHOICES = WRITABLE + ("original", "auto")
KNOWN_OUTPUTS = ("webp", "jpeg", "png", "avif", "original", "auto")
MISSING_HINT = {
    "avif": "this Pillow has no AVIF support (Pillow 11.2+ wheels include libavif)",
    "heic": "HEIC/HEIF input needs pillow-heif: pip install 'imgworker[heif]'",
}


def accepted(accept: str) -> dict[str, float]:
    """Media types of an Accept header with their q-values (q=0 means refused)."""
    out: dict[str, float] = {}
    for part in accept.split(",")[:64]:  # a hostile header of 10k entries is cut short
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            m = re.fullmatch(r"q\s*=\s*([01](?:\.\d{0,3})?)", param, re.I)
            if m:
                q = min(1.0, float(m.group(1)))
        out[media] = max(q, out.get(media, 0.0)) if media in out else q
    return out


def negotiate(accept: str | None, has_alpha: bool, animated: bool = False) -> str:
    """The output format for ``format=auto``: the first of AVIF (when this
    install writes it) and WebP that the client lists explicitly, else PNG
    for alpha, GIF for an animation, JPEG otherwise."""
    types = accepted(accept or "")
    for fmt in ("webp", "avif") if animated else ("avif", "webp"):
        if fmt in WRITABLE and types.get(f"image/{fmt}", 0.0) > 0:
            return fmt
    if animated:
        return "gif"
    return "png" if has_alpha else "jpeg"


# (WebP quality, AVIF quality) pairs of equal mean SSIM, measured on 12
# detailed photos fitted to 1024 px at speed 8 (bench/formats_bench.py
# --calibrate); linear in between. On smooth pictures (skies, bokeh) AVIF
# reaches WebP's SSIM lower still (80 -> about 50): this table is the
# conservative one, so AVIF is never visibly worse than WebP at a setting.
_AVIF_QUALITY = ((1, 1), (10, 27), (20, 35), (30, 42), (40, 46), (50, 50), (60, 54), (70, 58), (80, 66),
                 (90, 80), (95, 87), (100, 100))


def avif_quality(quality: int) -> int:
    """libavif quality (0-100) giving about the SSIM of WebP at ``quality``."""
    q = max(1, min(100, int(quality)))
    xs = [x for x, _ in _AVIF_QUALITY]
    i = bisect_left(xs, q)
    if xs[i] == q:
        return _AVIF_QUALITY[i][1]
    (x0, y0), (x1, y1) = _AVIF_QUALITY[i - 1], _AVIF_QUALITY[i]
    return round(y0 + (y1 - y0) * (q - x0) / (x1 - x0))
