"""AVIF against WebP through the pipeline's own encoder: bytes, SSIM and CPU per image.

    .venv/bin/python bench/formats_bench.py [--photos N] [--speeds 6,7,8,9] [--calibrate]

Each photo of Debian's mate-backgrounds is fitted to 1024 px (as the service
does by default), then encoded as WebP at COMPRESSION_QUALITY (80) and as
AVIF at each speed with the mapped quality (formats.avif_quality). SSIM is
the mean 8x8-block SSIM of luma against the resized source (Pillow only, no
numpy). CPU is this process's user+system time for the encode (one encoder
thread, as in the workers). With node and sharp installed (``npm i sharp``
beside this file, or in $SHARP_DIR), sharp's AVIF (effort 4) is measured too.

``--calibrate`` prints SSIM per quality for both codecs: the table behind
formats.avif_quality (WebP quality -> AVIF quality of equal SSIM).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image, ImageMath  # noqa: E402

from common import photos  # noqa: E402
from imgworker import formats, imaging  # noqa: E402


def ssim(a: Image.Image, b: Image.Image, block: int = 8) -> float:
    """Mean SSIM over non-overlapping block x block windows of luma."""
    x, y = a.convert("L").convert("F"), b.convert("L").convert("F")
    sw, sh = max(1, x.width // block), max(1, x.height // block)
    x, y = x.crop((0, 0, sw * block, sh * block)), y.crop((0, 0, sw * block, sh * block))

    def mean(im: Image.Image) -> Image.Image:
        return im.resize((sw, sh), Image.Resampling.BOX)

    def mul(p: Image.Image, q: Image.Image) -> Image.Image:
        return ImageMath.lambda_eval(lambda d: d["p"] * d["q"], p=p, q=q)

    mx, my, exx, eyy, exy = mean(x), mean(y), mean(mul(x, x)), mean(mul(y, y)), mean(mul(x, y))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ImageMath.lambda_eval(
        lambda d: ((2 * d["mx"] * d["my"] + c1) * (2 * (d["exy"] - d["mx"] * d["my"]) + c2))
        / ((d["mx"] * d["mx"] + d["my"] * d["my"] + c1) * (d["exx"] - d["mx"] * d["mx"] + d["eyy"] - d["my"] * d["my"] + c2)),
        mx=mx, my=my, exx=exx, eyy=eyy, exy=exy)
    return m.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))  # ImageStat bins F images: mean by BOX


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        im = Image.open(p)
        im.draft("RGB", (2048, 2048))
        im = im.convert("RGB")
        im.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
        out.append(im)
    return out


def measure(images: list[Image.Image], fmt: str, quality: int, speed: int = 6, raw: bool = False) -> tuple[float, float, float]:
    """Mean (KB, SSIM, CPU ms) per image. raw: libavif quality as given (no mapping)."""
    size = score = spent = 0.0
    for im in images:
        t = cpu()
        if raw:
            buf = io.BytesIO()
            im.save(buf, "AVIF", quality=quality, speed=speed, max_threads=1)
            data = buf.getvalue()
        else:
            data = imaging._encode([im.copy()], [], 0, fmt, quality, speed)
        spent += cpu() - t
        size += len(data)
        score += ssim(im, Image.open(io.BytesIO(data)))
    n = len(images)
    return size / n / 1024, score / n, spent / n * 1000


def sharp(images: list[Image.Image], qualities: tuple[int, ...]) -> list[tuple[int, float, float, float]]:
    """sharp's AVIF (libheif + aom, effort 4 = its default, one libvips
    thread) at each quality: [(quality, KB, SSIM, CPU ms)]; [] without node/sharp."""
    node = shutil.which("node")
    root = Path(os.environ.get("SHARP_DIR") or Path(__file__).resolve().parent)
    if not node or not (root / "node_modules" / "sharp").is_dir():
        return []
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, im in enumerate(images):
            im.save(Path(tmp) / f"{i}.png")
        for q in qualities:
            script = ("const sharp=require('sharp');sharp.concurrency(1);const fs=require('fs');(async()=>{let ms=0;"
                      f"for(let i=0;i<{len(images)};i++){{const input=fs.readFileSync('{tmp}/'+i+'.png');"
                      "const t=process.cpuUsage();"
                      f"const b=await sharp(input).avif({{quality:{q},effort:4}}).toBuffer();"
                      f"const u=process.cpuUsage(t);ms+=(u.user+u.system)/1000;fs.writeFileSync('{tmp}/'+i+'.avif',b)}}"
                      "console.log(ms)})()")
            done = subprocess.run([node, "-e", script], cwd=root, capture_output=True, text=True, check=True)
            n = len(images)
            size = sum((Path(tmp) / f"{i}.avif").stat().st_size for i in range(n))
            score = sum(ssim(im, Image.open(Path(tmp) / f"{i}.avif")) for i, im in enumerate(images))
            out.append((q, size / n / 1024, score / n, float(done.stdout) / n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=12)
    ap.add_argument("--speeds", default="6,7,8,9")
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--calibrate", action="store_true")
    args = ap.parse_args()
    paths = [p for p in photos() if p.suffix.lower() in (".jpg", ".jpeg")][: args.photos]
    images = load(paths)
    print(f"{len(images)} photos fitted to 1024 px; Pillow AVIF (libavif {formats.features.version('avif')})")
    if args.calibrate:
        for q in (10, 20, 30, 40, 50, 60, 70, 80, 90, 95):
            kb, s, ms = measure(images, "webp", q)
            print(f"webp q{q:3d}: {kb:6.1f} KB  SSIM {s:.4f}  {ms:5.0f} ms")
        for q in (10, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90):
            kb, s, ms = measure(images, "avif", q, speed=8, raw=True)
            print(f"avif libavif q{q:3d} speed 8: {kb:6.1f} KB  SSIM {s:.4f}  {ms:5.0f} ms")
        return
    base_kb, base_s, base_ms = measure(images, "webp", args.quality)
    print(f"WebP q{args.quality} (method 4): {base_kb:6.1f} KB  SSIM {base_s:.4f}  CPU {base_ms:5.0f} ms per image")
    for speed in (int(s) for s in args.speeds.split(",")):
        kb, s, ms = measure(images, "avif", args.quality, speed)
        print(f"AVIF q{args.quality}->{formats.avif_quality(args.quality)} speed {speed}: {kb:6.1f} KB ({kb / base_kb - 1:+.0%})  "
              f"SSIM {s:.4f}  CPU {ms:5.0f} ms ({ms / base_ms:.1f}x WebP)")
    others = sharp(images, (50, 60, 70))
    for q, kb, s, ms in others:
        print(f"sharp AVIF q{q} effort 4: {kb:6.1f} KB ({kb / base_kb - 1:+.0%})  SSIM {s:.4f}  CPU {ms:5.0f} ms "
              f"({ms / base_ms:.1f}x WebP)")
    if not others:
        print("sharp: not measured (needs node and `npm i sharp` in bench/ or in $SHARP_DIR)")


if __name__ == "__main__":
    main()
