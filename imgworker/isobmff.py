"""HEIF/AVIF (ISO base media file format) headers, read without decoding.

AVIF and HEIC are the same container (HEIF, ISO/IEC 23008-12) around
different codecs: boxes ``ftyp`` (brands), ``meta`` (items: the primary
picture, grid tiles, alpha and depth planes, thumbnails, EXIF, each with
properties such as ``ispe`` = its size, ``irot``/``imir`` = how to turn it)
and, for image sequences, ``moov`` (tracks of frames).

Contract: :func:`inspect` reads only the box headers of a file and returns
its :class:`Header` or raises :class:`HeaderError` with a code of SPEC §4:
``UNSUPPORTED_FORMAT`` for an ISOBMFF file that is not a still image of a
codec we decode (an MP4 video, a JPEG-in-HEIF...), ``INVALID_IMAGE`` for a
broken structure, ``IMAGE_TOO_LARGE`` for sizes over the limits (the caller
passes them). The format comes from the content (the primary item's codec),
not from the brand alone. The decoders (libavif, libheif) allocate from these
same numbers, so a header bomb is refused here before any pixel is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

AVIF_BRANDS = {b"avif", b"avis", b"avio"}
HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
HEIF_BRANDS = {b"mif1", b"msf1", b"mif2", b"miaf", b"MiHE", b"MiHA", b"MiHB", b"MiAN", b"MA1A", b"MA1B"}
CODECS = {b"av01": "avif", b"hvc1": "heic", b"hev1": "heic"}
DERIVED = {b"grid", b"iovl", b"iden"}  # made of other image items (dimg references)

MAX_BOX_BYTES = 16 * 1024 * 1024  # meta/moov larger than this is not a picture's header
MAX_BOXES = 200_000  # boxes walked per file: bounds the parsing work
MAX_ITEMS = 4096  # a 48 Mpx phone photo has a few hundred (tiles, gain map, thumbnail)


class HeaderError(Exception):
    """The header is refused; ``code`` is one of SPEC §4."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Header:
    """What the boxes say. ``width``/``height`` are the primary picture's
    stored size (``ispe``, before ``irot``); ``frames`` counts a sequence's
    samples (1 for a still)."""

    format: str  # "avif" or "heic"
    width: int
    height: int
    frames: int = 1
    rotation: int = 0  # irot, degrees anticlockwise
    mirror: int | None = None  # imir axis
    items: int = 0
    alpha: bool = False


def sniff(head: bytes) -> str | None:
    """"avif", "heic", "heif" (a HEIF brand; the codec decides) or "mp4"
    (another ISOBMFF file) from the first 32+ bytes; None if not ISOBMFF."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return None
    size = struct.unpack(">I", head[:4])[0]
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
    major = head[8:12]
    if major in AVIF_BRANDS:
        return "avif"
    if major in HEIC_BRANDS:
        return "heic"
    if major in HEIF_BRANDS or brands & (AVIF_BRANDS | HEIC_BRANDS):
        if brands & AVIF_BRANDS:
            return "avif"
        if brands & HEIC_BRANDS:
            return "heic"
        return "heif"
    return "mp4"


class _Reader:
    """Box walker over byte strings, counting boxes against MAX_BOXES."""

    def __init__(self) -> None:
        self.boxes = 0

    def walk(self, data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
        end = len(data) if end is None else end
        pos = start
        while pos + 8 <= end:
            self.boxes += 1
            if self.boxes > MAX_BOXES:
                raise HeaderError("INVALID_IMAGE", "The HEIF header has an implausible number of boxes")
            size, kind = struct.unpack(">I4s", data[pos:pos + 8])
            head = 8
            if size == 1:
                if pos + 16 > end:
                    raise _truncated()
                size, head = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
            elif size == 0:
                size = end - pos
            if size < head or pos + size > end:
                raise _truncated()
            yield kind, pos + head, pos + size
            pos += size


def _truncated() -> HeaderError:
    return HeaderError("INVALID_IMAGE", "The HEIF/AVIF file is truncated or its boxes are corrupt")


def _u(data: bytes, pos: int, n: int) -> int:
    if n == 0:
        return 0
    if pos + n > len(data):
        raise _truncated()
    return int.from_bytes(data[pos:pos + n], "big")


def _top_level(fh: BinaryIO) -> dict[bytes, bytes]:
    """The payloads of the top-level ftyp, meta and moov boxes; others skipped by seeking."""
    found: dict[bytes, bytes] = {}
    pos, count = 0, 0
    length = fh.seek(0, 2)
    while True:
        if pos + 8 > length:
            return found
        fh.seek(pos)
        head = fh.read(16)
        count += 1
        if count > 10_000:
            raise HeaderError("INVALID_IMAGE", "The HEIF file has an implausible number of top-level boxes")
        size, kind = struct.unpack(">I4s", head[:8])
        hlen = 8
        if size == 1:
            if len(head) < 16:
                raise _truncated()
            size, hlen = struct.unpack(">Q", head[8:16])[0], 16
        elif size == 0:
            size = length - pos
        if size < hlen or pos + size > length:  # a box running past the end: the file was cut
            raise _truncated()
        if kind in (b"ftyp", b"meta", b"moov") and kind not in found:
            if size - hlen > MAX_BOX_BYTES:
                raise HeaderError("INVALID_IMAGE", f"The HEIF {kind.decode()} box is implausibly large ({size:,} bytes)")
            fh.seek(pos + hlen)
            payload = fh.read(size - hlen)
            if len(payload) < size - hlen:
                raise _truncated()
            found[kind] = payload
        pos += size


def _meta(data: bytes, reader: _Reader, fh: BinaryIO) -> dict:
    """Items, their types, properties and references from a meta box payload."""
    out: dict = {"types": {}, "props": {}, "refs": [], "primary": None, "handler": None, "loc": {}, "idat": b""}
    ipco: list[tuple[bytes, bytes]] = []
    ipma: list[tuple[int, list[int]]] = []
    for kind, start, end in reader.walk(data, 4):  # meta is a full box: 4 bytes version/flags
        body = data[start:end]
        if kind == b"hdlr":
            out["handler"] = body[8:12]
        elif kind == b"pitm":
            out["primary"] = _u(body, 4, 2 if body[:1] == b"\x00" else 4)
        elif kind == b"iinf":
            version = _u(body, 0, 1)
            first = 4 + (2 if version == 0 else 4)
            for ikind, istart, iend in reader.walk(body, first):
                if ikind != b"infe":
                    continue
                infe = body[istart:iend]
                v = _u(infe, 0, 1)
                if v < 2:
                    continue  # pre-HEIF item entries carry no item type
                wide = 4 if v >= 3 else 2
                item_id = _u(infe, 4, wide)
                out["types"][item_id] = infe[4 + wide + 2:4 + wide + 6]
                if len(out["types"]) > MAX_ITEMS:
                    raise HeaderError("IMAGE_TOO_LARGE", f"The HEIF file has more than {MAX_ITEMS} items")
        elif kind == b"iref":
            wide = 4 if _u(body, 0, 1) else 2
            for rkind, rstart, rend in reader.walk(body, 4):
                ref = body[rstart:rend]
                src = _u(ref, 0, wide)
                count = _u(ref, wide, 2)
                targets = [_u(ref, wide + 2 + i * wide, wide) for i in range(count)]
                out["refs"].append((rkind, src, targets))
        elif kind == b"iprp":
            for pkind, pstart, pend in reader.walk(body):
                if pkind == b"ipco":
                    ipco = [(k, body[s:e]) for k, s, e in reader.walk(body, pstart, pend)]
                elif pkind == b"ipma":
                    ipma.extend(_ipma(body[pstart:pend]))
        elif kind == b"iloc":
            out["loc"] = _iloc(body)
        elif kind == b"idat":
            out["idat"] = body
    for item_id, indexes in ipma:
        props = out["props"].setdefault(item_id, {})
        for index in indexes:
            if 1 <= index <= len(ipco):
                pkind, pbody = ipco[index - 1]
                props.setdefault(pkind, pbody)
    return out


def _ipma(body: bytes) -> Iterator[tuple[int, list[int]]]:
    version, flags = _u(body, 0, 1), _u(body, 1, 3)
    pos, count = 8, _u(body, 4, 4)
    if count > MAX_ITEMS:
        raise HeaderError("IMAGE_TOO_LARGE", f"The HEIF file has more than {MAX_ITEMS} items")
    for _ in range(count):
        wide = 2 if version < 1 else 4
        item_id = _u(body, pos, wide)
        n = _u(body, pos + wide, 1)
        pos += wide + 1
        indexes = []
        for _ in range(n):
            if flags & 1:
                indexes.append(_u(body, pos, 2) & 0x7FFF)
                pos += 2
            else:
                indexes.append(_u(body, pos, 1) & 0x7F)
                pos += 1
        yield item_id, indexes


def _iloc(body: bytes) -> dict[int, tuple[int, int, int]]:
    """item id -> (construction method, offset, length) of its first extent."""
    version = _u(body, 0, 1)
    sizes = _u(body, 4, 2)
    off_size, len_size, base_size = sizes >> 12, (sizes >> 8) & 15, (sizes >> 4) & 15
    index_size = sizes & 15 if version in (1, 2) else 0
    pos = 6
    wide = 4 if version == 2 else 2
    count = _u(body, pos, wide)
    pos += wide
    if count > MAX_ITEMS:
        raise HeaderError("IMAGE_TOO_LARGE", f"The HEIF file has more than {MAX_ITEMS} items")
    out = {}
    for _ in range(count):
        item_id = _u(body, pos, wide)
        pos += wide
        method = 0
        if version in (1, 2):
            method = _u(body, pos, 2) & 15
            pos += 2
        pos += 2  # data_reference_index
        base = _u(body, pos, base_size)
        pos += base_size
        extents = _u(body, pos, 2)
        pos += 2
        first = None
        for _ in range(extents):
            pos += index_size
            offset = _u(body, pos, off_size)
            length = _u(body, pos + off_size, len_size)
            pos += off_size + len_size
            first = first or (method, base + offset, length)
        if first:
            out[item_id] = first
    return out


def _grid_size(meta: dict, item_id: int, fh: BinaryIO) -> tuple[int, int, int] | None:
    """(rows x columns, output width, output height) from a grid item's data."""
    loc = meta["loc"].get(item_id)
    if loc is None:
        return None
    method, offset, length = loc
    if method == 1:
        data = meta["idat"][offset:offset + min(length or 12, 12)]
    elif method == 0:
        if offset + 8 > fh.seek(0, 2):
            raise _truncated()
        fh.seek(offset)
        data = fh.read(min(length or 12, 12))
    else:
        return None
    if len(data) < 8:
        raise _truncated()
    wide = 4 if data[1] & 1 else 2
    rows, cols = data[2] + 1, data[3] + 1
    return rows * cols, _u(data, 4, wide), _u(data, 4 + wide, wide)


def _ispe(props: dict) -> tuple[int, int] | None:
    body = props.get(b"ispe")
    if body is None or len(body) < 12:
        return None
    return struct.unpack(">II", body[4:12])


def _tracks(data: bytes, reader: _Reader) -> tuple[int, int, int]:
    """(frames, width, height) of the largest picture track of a moov box."""
    frames = width = height = 0
    for kind, start, end in reader.walk(data):
        if kind != b"trak":
            continue
        handler, samples, w, h = b"", 0, 0, 0
        stack = [(start, end)]
        while stack:  # trak/mdia/minf/stbl hold what we need; walk them depth-first
            s, e = stack.pop()
            for k, cs, ce in reader.walk(data, s, e):
                if k in (b"mdia", b"minf", b"stbl"):
                    stack.append((cs, ce))
                elif k == b"hdlr":
                    handler = data[cs + 8:cs + 12]
                elif k == b"stsz":
                    samples = _u(data, cs + 8, 4)
                elif k == b"stz2":
                    samples = _u(data, cs + 8, 4)
                elif k == b"stsd":
                    entry = cs + 8  # full box + entry count; first sample entry follows
                    if entry + 8 + 28 <= ce:
                        w, h = _u(data, entry + 8 + 24, 2), _u(data, entry + 8 + 26, 2)
        if handler in (b"pict", b"vide") and samples:
            frames = max(frames, samples)
            width, height = max(width, w), max(height, h)
    return frames, width, height


def inspect(fh: BinaryIO, max_pixels: int, max_total_pixels: int) -> Header:
    """Check a HEIF/AVIF file's structure and sizes from its boxes alone.

    ``max_pixels`` bounds every picture (the primary, each tile, alpha,
    depth, thumbnail, a sequence's frame); ``max_total_pixels`` bounds the sum
    over all pictures (an animation's frames x canvas, a grid's tiles).
    """
    boxes = _top_level(fh)
    ftyp = boxes.get(b"ftyp")
    if ftyp is None:
        raise HeaderError("INVALID_IMAGE", "The HEIF file has no ftyp box")
    kind = sniff(struct.pack(">I", len(ftyp) + 8) + b"ftyp" + ftyp[:64])
    if kind == "mp4":
        raise HeaderError("UNSUPPORTED_FORMAT", f"Unsupported file type (an ISO media file of brand "
                          f"{ftyp[:4].decode('latin-1')!r}, not a HEIF/AVIF image)")
    reader = _Reader()
    header = Header(kind or "heif", 0, 0)
    if b"moov" in boxes and kind == "avif":
        frames, w, h = _tracks(boxes[b"moov"], reader)
        if frames:
            _check_size(w, h, max_pixels, "A frame of the AVIF sequence")
            if frames * w * h > max_total_pixels:
                raise HeaderError("IMAGE_TOO_LARGE", f"The animation is {frames} frames of {w}x{h}; the limit is "
                                  f"{max_total_pixels:,} pixels in all frames")
            header.frames, header.width, header.height = frames, w, h
    if b"meta" not in boxes:
        if header.frames > 1 or header.width:
            return header
        raise HeaderError("INVALID_IMAGE", "The HEIF file has no meta box (no picture)")
    meta = _meta(boxes[b"meta"], reader, fh)
    if meta["handler"] != b"pict":
        raise HeaderError("UNSUPPORTED_FORMAT", "Unsupported file type (a HEIF file without pictures)")
    header.items = len(meta["types"])
    primary = meta["primary"]
    ptype = meta["types"].get(primary)
    if ptype is None:
        raise HeaderError("INVALID_IMAGE", "The HEIF file names no primary picture")
    dimg = {src: targets for rkind, src, targets in meta["refs"] if rkind == b"dimg"}
    codec = ptype
    if ptype in DERIVED:
        tiles = dimg.get(primary) or []
        if not tiles:
            raise HeaderError("INVALID_IMAGE", "The HEIF grid has no tiles")
        codec = meta["types"].get(tiles[0], b"????")
    fmt = CODECS.get(codec)
    if fmt is None:
        raise HeaderError("UNSUPPORTED_FORMAT", f"Unsupported file type (a HEIF file coded as "
                          f"{codec.decode('latin-1')!r}; accepted codecs: AV1, HEVC)")
    header.format = fmt
    size = _ispe(meta["props"].get(primary, {}))
    if size is None:
        raise HeaderError("INVALID_IMAGE", "The HEIF primary picture has no size (ispe)")
    width, height = size
    _check_size(width, height, max_pixels, "The image")
    total = 0
    for item_id, itype in meta["types"].items():  # every picture, tiles, alpha, depth, thumbnails
        ispe = _ispe(meta["props"].get(item_id, {}))
        if ispe is not None and (itype in CODECS or itype in DERIVED):
            _check_size(*ispe, max_pixels, "A picture inside the HEIF file", allow_empty=True)
            total += ispe[0] * ispe[1]
        if itype == b"grid":
            grid = _grid_size(meta, item_id, fh)
            if grid is not None:
                cells, gw, gh = grid
                _check_size(gw, gh, max_pixels, "The HEIF grid")
                if cells != len(dimg.get(item_id, [])):
                    raise HeaderError("INVALID_IMAGE", f"The HEIF grid has {cells} cells but "
                                      f"{len(dimg.get(item_id, []))} tiles")
    if total > max_total_pixels:
        raise HeaderError("IMAGE_TOO_LARGE", f"The pictures inside the HEIF file add up to {total:,} pixels; "
                          f"the limit is {max_total_pixels:,}")
    props = meta["props"].get(primary, {})
    if b"irot" in props and len(props[b"irot"]) >= 1:
        header.rotation = (props[b"irot"][0] & 3) * 90
    if b"imir" in props and len(props[b"imir"]) >= 1:
        header.mirror = props[b"imir"][0] & 1
    for rkind, src, targets in meta["refs"]:
        if rkind == b"auxl" and primary in targets:
            aux = meta["props"].get(src, {}).get(b"auxC", b"")
            header.alpha = header.alpha or b"alpha" in aux or aux[4:].startswith(b"urn:mpeg:hevc:2015:auxid:1\x00")
    if header.frames <= 1:
        header.width, header.height = width, height
    return header


def _check_size(width: int, height: int, max_pixels: int, what: str, allow_empty: bool = False) -> None:
    if width <= 0 or height <= 0:
        if allow_empty:
            return
        raise HeaderError("INVALID_IMAGE", f"{what} has an empty size ({width}x{height})")
    if width * height > max_pixels:
        raise HeaderError("IMAGE_TOO_LARGE", f"{what} is {width}x{height} ({width * height:,} pixels); "
                          f"the limit is {max_pixels:,} pixels")
