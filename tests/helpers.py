"""Plain helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io


def image_bytes(fmt="JPEG", size=(64, 48), mode="RGB", color=(200, 30, 30), **save):
    """A generated image encoded as ``fmt``."""
    from PIL import Image

    im = Image.new(mode, size, color)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()
