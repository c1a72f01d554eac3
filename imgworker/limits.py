"""The pipeline's limits and defaults as one value (from Config). Its own
module so that the supervisor and the wire format can carry limits without
importing Pillow."""

from __future__ import annotations

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
