"""The pipeline's limits and defaults as one value (from Config), and the
check of the worker's address-space cap. Its own module so that the
supervisor and the wire format can carry limits without importing Pillow."""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Server-side limits and defaults (from Config; see config.py)."""

    max_width: int = 1024
    max_height: int = 1024
    max_input_pixels: int = 50_000_000
    max_frames: int = 1000
    max_animation_pixels: int = 500_000_000
    formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif")
    quality: int = 80
    output_format: str = "webp"
    avif_speed: int = 6
    max_jpeg_scans: int = 100

    @classmethod
    def from_config(cls, cfg: Any) -> "Limits":
        return cls(cfg.max_image_width, cfg.max_image_height, cfg.max_input_pixels, cfg.max_frames,
                   cfg.max_animation_pixels, tuple(cfg.supported_formats), cfg.quality, cfg.output_format,
                   cfg.avif_speed, cfg.max_jpeg_scans)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Limits":
        return cls(**{**data, "formats": tuple(data["formats"])})


def fits_in_address_space(need: int) -> bool:
    """Whether ``need`` more bytes fit under RLIMIT_AS (the worker's memory
    cap), with room to spare. Some native code does not fail cleanly when an
    allocation is refused: the fast resizer is Rust, which aborts the whole
    process (SIGABRT, the job lost with its worker), and the ``deflate``
    extension does not check its decompressor's malloc; Pillow raises
    MemoryError (IMAGE_TOO_LARGE, the worker lives on). So such code runs
    only where its buffers certainly fit; otherwise Pillow does the work or
    fails cleanly."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return True
    used = memory_in_use()
    return used is not None and used[0] + need + _ADDRESS_SPARE <= limit


def memory_in_use() -> tuple[int, int] | None:
    """(address space, resident set) of this process now, in bytes (Linux's
    /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            size, resident = fh.read().split()[:2]
        return int(size) * _PAGE, int(resident) * _PAGE
    except (OSError, ValueError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE")
_ADDRESS_SPARE = 32 * 2**20  # allocator slack, stacks, what a concurrent import maps
