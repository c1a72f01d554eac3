"""The shared corpus through the pipeline (skipped when ../shared/corpus is absent)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageChops, ImageStat

from imgworker.errors import ImageError
from imgworker.imaging import Limits, process
from imgworker.views import result_view

from conftest import CORPUS

LIMITS = Limits()
REFUSAL_CODES = {"UNSUPPORTED_FORMAT", "INVALID_IMAGE", "IMAGE_TOO_LARGE"}
EDGE_REFUSED = {
    "huge_9400x9400_L.png": {"IMAGE_TOO_LARGE"},
    "huge_9400x9400_RGBA.png": {"IMAGE_TOO_LARGE"},
    "huge_9400x9400_gray.jpg": {"IMAGE_TOO_LARGE"},
    "huge_9400x9400_lossless.webp": {"IMAGE_TOO_LARGE"},
    "gif_4000x4000_2000_tiny_frames.gif": {"IMAGE_TOO_LARGE"},
    "monkey12.jpg": {"INVALID_IMAGE"},
    "truncated_end_chunk.png": {"INVALID_IMAGE"},
}
MAYBE_PROCESSED = {"monkey12.jpg", "truncated_end_chunk.png"}  # INVALID_IMAGE "is fine"


def files(folder):
    d = CORPUS / folder
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("name", files("good"))
def test_good_files_process(corpus, tmp_path, name):
    result = result_view("j", name, process(corpus / "good" / name, tmp_path, "j", {}, LIMITS))
    out = Image.open(tmp_path / result["processedFile"]["filename"])
    out.load()
    w, h = result["processedFile"]["dimensions"].values()
    assert out.size == (w, h) and w <= 1024 and h <= 1024


@pytest.mark.parametrize("name", files("edge"))
def test_edge_files_have_their_outcome(corpus, tmp_path, name):
    started = time.monotonic()
    try:
        result = result_view("j", name, process(corpus / "edge" / name, tmp_path, "j", {}, LIMITS))
    except ImageError as exc:
        assert name in EDGE_REFUSED, f"{name} refused: {exc.code} {exc.message}"
        assert exc.code in EDGE_REFUSED[name]
    else:
        assert name not in EDGE_REFUSED or name in MAYBE_PROCESSED, f"{name} should be refused"
        if name == "orientation_rectangle.jpg":
            assert result["processedFile"]["dimensions"] == {"width": 1, "height": 2}
        if name == "sugarshack.mpo":
            assert result["originalFile"]["format"] == "jpeg"
        if name == "polyglot_jpeg_zip.jpg":
            assert b"PK" not in (tmp_path / result["processedFile"]["filename"]).read_bytes()
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("name", files("bad"))
def test_bad_files_refused_quickly(corpus, tmp_path, name):
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        process(corpus / "bad" / name, tmp_path, "j", {}, LIMITS)
    assert err.value.code in REFUSAL_CODES and not err.value.transient
    assert time.monotonic() - started < 1.0
    assert not any(tmp_path.iterdir())


def test_landscape_orientations_all_match_landscape_1(corpus, tmp_path):
    def render(n):
        r = result_view(f"l{n}", "", process(corpus / "good" / f"Landscape_{n}.jpg", tmp_path, f"l{n}", {"format": "png"}, LIMITS))
        return Image.open(tmp_path / r["processedFile"]["filename"]).convert("L").resize((64, 43))

    reference = render(1)
    for n in range(0, 9):
        diff = ImageStat.Stat(ImageChops.difference(render(n), reference)).mean[0]
        assert diff < 8, f"Landscape_{n} differs from Landscape_1 by {diff:.1f}"


MEASURE = r"""
import json, resource, sys, tempfile
from pathlib import Path
from imgworker.imaging import Limits, process
from imgworker.errors import ImageError
out = tempfile.mkdtemp()
for folder in sys.argv[1:]:
    for p in sorted(Path(folder).iterdir()):
        try:
            process(p, out, "m", {}, Limits())
        except ImageError:
            pass
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
"""


def test_hostile_files_stay_within_memory(corpus):
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(corpus / "bad"), str(corpus / "edge")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak_mb = json.loads(proc.stdout)
    assert peak_mb < 300, f"peak RSS {peak_mb} MB"
