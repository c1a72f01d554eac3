"""Pipeline benchmark: imgworker's pipeline vs a naive Pillow one vs sharp.

    .venv/bin/pip install numpy          # SSIM only; not a project dependency
    .venv/bin/python bench/pipeline_bench.py [--rounds 2] [--formats webp,jpeg]

The job is the seed's: auto-orient, fit inside 1024x1024 without enlarging,
strip metadata, WebP q80 or progressive JPEG q80 (alpha flattened on white).
Inputs: Debian's mate-backgrounds (real photos and RGBA PNG wallpapers, 1280
to 5640 px; fetched into bench/.photos) plus generated cases in bench/.gen:
3640x2400 RGBA PNGs with real transparency and with an all-opaque alpha,
EXIF-rotated JPEGs (orientation 6 and 8) and a CMYK JPEG.

Measured in one process, interleaved, in CPU seconds (time.process_time; the
machine is shared, wall time is noise):
  (a) imgworker.imaging.process,
  (b) a naive Pillow pipeline (open, exif_transpose, thumbnail, save),
  (c) sharp 0.35 in one thread (/work/shared/peers/sharp_dir.js), when node
      and npm are present: sharp is installed into a temp folder; its CPU per
      image is (whole folder - empty folder) / images, i.e. without node's
      start-up. Also both whole commands as a user runs them: `imgworker
      process --local` and `node sharp_dir.js` on the same folder.
(a) and (b) run with the pool worker's heap settings (heap.keep_freed_memory).
The same figures for the big inputs alone (longest side >= 3640 px) and for
those of the size issue 11's external test uses (3640-3840 px JPEG and RGBA
PNG wallpapers: all but the 5640 px photo), the two whole commands on a
folder of the latter, and each big input's CPU for imgworker, naive Pillow
and sharp (sharp per file: bench/sharp_files.js,
process.cpuUsage() around each file after an uncounted warm-up, in the same
rounds).
Quality: SSIM (luma, 11x11 Gaussian, sigma 1.5) of every output against a
float reference: full decode, orient, ICC to sRGB, flatten on white, float
LANCZOS to the output's size. Finally the peak RSS of a fresh interpreter
running the pipeline on a 5640x3172 JPEG (what a pool worker peaks at).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image, ImageCms, ImageOps  # noqa: E402

from common import HERE, photos  # noqa: E402
from imgworker.imaging import Limits, process  # noqa: E402

PEERS = Path(os.environ.get("PEERS_DIR", "/work/shared/peers"))
GEN = HERE / ".gen"
BOX = (1024, 1024)
BIG_SIDE = 3640  # "big inputs": longest side at least this (issue 11's external test: 3640-3840 px)
ISSUE_MAX_SIDE = 3840  # the external test's range ends here: the 5640 px photo is big, but not of that kind
QUALITY = 80
EXT = {"webp": ".webp", "jpeg": ".jpg"}


# --- inputs --------------------------------------------------------------------------------------

def generated() -> list[Path]:
    """The cases mate-backgrounds lacks, made once from its largest photo."""
    names = ["rgba_alpha_3640x2400.png", "rgba_opaque_3640x2400.png", "orient6_2560x1600.jpg",
             "orient8_3840x2160.jpg", "cmyk_2560x1600.jpg"]
    if all((GEN / n).exists() for n in names):
        return [GEN / n for n in names]
    GEN.mkdir(exist_ok=True)
    big = {p.name: p for p in photos()}
    with Image.open(big["Elephants_5640x3172.jpg"]) as im:
        photo = im.convert("RGB").resize((3640, 2400), Image.Resampling.LANCZOS)
    # real transparency: a radial fade, a fully transparent corner and a hard-edged opaque band
    alpha = Image.radial_gradient("L").resize(photo.size).point(lambda v: 255 - v)
    alpha.paste(0, (0, 0, 800, 600))
    alpha.paste(255, (0, 1100, 3640, 1300))
    rgba = photo.copy()
    rgba.putalpha(alpha)
    rgba.save(GEN / names[0], compress_level=6)
    opaque = photo.copy()
    opaque.putalpha(255)
    opaque.save(GEN / names[1], compress_level=6)
    with Image.open(big["Garden.jpg"]) as im:
        stored = im.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back upright
        exif = Image.Exif()
        exif[0x0112] = 6
        stored.save(GEN / names[2], quality=92, exif=exif)
    with Image.open(big["Elephants_3840x2160.jpg"]) as im:
        stored = im.transpose(Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = 8
        stored.save(GEN / names[3], quality=92, exif=exif)
    with Image.open(big["Aqua.jpg"]) as im:
        im.convert("CMYK").save(GEN / names[4], quality=92)
    return [GEN / n for n in names]


# --- pipelines -----------------------------------------------------------------------------------

def run_imgworker(src: Path, out_dir: Path, fmt: str, n: int) -> Path:
    job = f"b{n}"
    process(src, out_dir, job, {"format": fmt, "quality": QUALITY}, Limits())
    return next(out_dir.glob(f"processed_{job}{EXT[fmt]}"))


def run_naive(src: Path, out_dir: Path, fmt: str, n: int) -> Path:
    """What a Pillow user writes first: open, exif_transpose, thumbnail, save."""
    out = out_dir / f"naive_{n}{EXT[fmt]}"
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im)
        im.thumbnail(BOX, Image.Resampling.LANCZOS)
        if fmt == "jpeg":
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            im.convert("RGB").save(out, "JPEG", quality=QUALITY, optimize=True, progressive=True)
        else:
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            im.save(out, "WEBP", quality=QUALITY)
    return out


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def cpu() -> float:
    return time.process_time()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def child(cmd: list[str], **kw) -> float:
    """CPU seconds (user + sys) of one whole child process."""
    before = children_cpu()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return children_cpu() - before


def install_sharp() -> Path | None:
    """sharp 0.35 in a temp folder, or None (with the reason printed)."""
    if not (shutil.which("node") and shutil.which("npm")):
        print("sharp: skipped (node/npm not found)")
        return None
    d = Path(tempfile.mkdtemp(prefix="sharp-"))
    r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "sharp@0.35"], cwd=d,
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"sharp: skipped (npm install failed: {r.stderr.strip()[-200:]})")
        return None
    return d / "node_modules" / "sharp"


# --- quality -------------------------------------------------------------------------------------

_refs: dict[tuple[str, tuple[int, int]], object] = {}


def _flat_luma(im: Image.Image, size: tuple[int, int] | None = None):
    """Luma (BT.601) in float of ``im`` flattened on white, resized in float if ``size``."""
    import numpy as np

    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    bands = [b.convert("F") for b in im.split()]
    if len(bands) == 4:  # premultiply, so that resizing and flattening commute exactly
        a = np.asarray(bands[3], dtype=np.float32) / 255
        chans = [np.asarray(b, dtype=np.float32) * a for b in bands[:3]]
        chans.append(a * 255)
        bands = [Image.fromarray(c.astype(np.float32), "F") for c in chans]
    if size and size != im.size:
        bands = [b.resize(size, Image.Resampling.LANCZOS) for b in bands]
    arr = [np.asarray(b, dtype=np.float32) for b in bands]
    if len(arr) == 4:
        a = np.clip(arr[3], 0, 255) / 255
        arr = [c + 255 * (1 - a) for c in arr[:3]]
    r, g, b = arr
    return 0.299 * r + 0.587 * g + 0.114 * b


def reference(src: Path, size: tuple[int, int]):
    key = (str(src), size)
    if key not in _refs:
        with Image.open(src) as im:
            im.load()
            icc = im.info.get("icc_profile")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "LA", "L", "I;16", "I") or "transparency" in im.info:
                im = im.convert("RGBA")
            if icc:
                try:
                    im = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                                   ImageCms.createProfile("sRGB"),
                                                   outputMode="RGBA" if im.mode == "RGBA" else "RGB")
                except ImageCms.PyCMSError:
                    pass
            _refs[key] = _flat_luma(im, size)
    return _refs[key]


def ssim(x, y) -> float:
    import numpy as np

    g = np.exp(-0.5 * (np.arange(11) - 5) ** 2 / 1.5**2)
    g /= g.sum()

    def blur(a):
        a = sum(w * a[:, i : a.shape[1] - 10 + i] for i, w in enumerate(g))
        return sum(w * a[i : a.shape[0] - 10 + i, :] for i, w in enumerate(g))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def score(src: Path, out: Path) -> float:
    with Image.open(out) as im:
        im.load()
        return ssim(reference(src, im.size), _flat_luma(im))


# --- the run -------------------------------------------------------------------------------------

def peak_rss_mb(big: Path, fmt: str) -> float:
    """Peak RSS (VmHWM) of a fresh interpreter that runs the pipeline once on ``big``.
    (Not ru_maxrss: Linux carries that over from the forking parent, this big process.)"""
    code = ("import re,sys,tempfile; from imgworker.imaging import Limits, process;"
            f"process(sys.argv[1], tempfile.mkdtemp(), 'rss', {{'format': '{fmt}'}}, Limits());"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code, str(big)], check=True, capture_output=True, text=True,
                         cwd=HERE.parent)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the figure is the mean")
    ap.add_argument("--formats", default="webp,jpeg")
    ap.add_argument("--detail", action="store_true", help="per-image CPU and SSIM")
    ap.add_argument("--variants", default=None, metavar="D[:pillow],...",
                    help="only imgworker, with JPEG draft gap D (the pipeline's is 2), resizing with the fast resizer "
                         "or with ':pillow' Pillow's own resize (reducing gap 2), e.g. 2,1,2:pillow")
    args = ap.parse_args()
    try:
        import numpy  # noqa: F401
    except ImportError:
        sys.exit("pipeline_bench needs numpy for SSIM: .venv/bin/pip install numpy")
    from imgworker import heap

    heap.keep_freed_memory()  # as a pool worker and `imgworker process` run the pipeline (heap.py)
    files = photos() + generated()
    if args.variants:
        return variants(files, args)
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    folder = work / "in"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    empty = work / "empty"
    empty.mkdir()
    sharp = install_sharp()
    big_inputs = [f for f in files if max(_size(f)) >= BIG_SIDE]
    in_range = [f for f in big_inputs if max(_size(f)) <= ISSUE_MAX_SIDE]
    big_folder = work / "big"  # 3640-3840 px alone, for the whole commands as issue 11's external test runs them
    big_folder.mkdir()
    for f in in_range:
        shutil.copy(f, big_folder / f.name)
    print(f"{len(files)} images (mate-backgrounds + {len(generated())} generated), box {BOX[0]}x{BOX[1]}, "
          f"q{QUALITY}, {args.rounds} interleaved rounds, CPU seconds")
    runners = {"imgworker": run_imgworker, "naive Pillow": run_naive}
    for fmt in args.formats.split(","):
        cpu_s: dict[str, list[float]] = {k: [] for k in (*runners, "sharp", "imgworker cmd", "sharp cmd",
                                                          "imgworker big cmd", "sharp big cmd")}
        outs: dict[str, dict[Path, Path]] = {k: {} for k in (*runners, "sharp")}
        per_file: dict[str, dict[Path, list[float]]] = {k: {f: [] for f in big_inputs} for k in (*runners, "sharp")}
        n = 0
        for rnd in range(args.rounds):
            order = list(runners) if rnd % 2 == 0 else list(reversed(runners))
            total = dict.fromkeys(runners, 0.0)
            for f in files:
                for name in order:
                    out_dir = work / name.replace(" ", "_")
                    out_dir.mkdir(exist_ok=True)
                    n += 1
                    t0 = cpu()
                    outs[name][f] = runners[name](folder / f.name, out_dir, fmt, n)
                    took = cpu() - t0
                    total[name] += took
                    if f in per_file[name]:
                        per_file[name][f].append(took)
            for name in runners:
                cpu_s[name].append(total[name] / len(files))
            if sharp:
                env = {**os.environ, "SHARP_MODULE": str(sharp)}
                js = str(PEERS / "sharp_dir.js")
                out_dir = work / f"sharp_{fmt}"
                whole = child(["node", js, str(folder), str(out_dir), fmt], env=env)
                start = child(["node", js, str(empty), str(work / "sharp_empty"), fmt], env=env)
                cpu_s["sharp"].append((whole - start) / len(files))
                cpu_s["sharp cmd"].append(whole)
                if in_range:
                    cpu_s["sharp big cmd"].append(child(["node", js, str(big_folder), str(work / f"sharp_big_{fmt}"),
                                                         fmt], env=env))
                for f in files:
                    outs["sharp"][f] = out_dir / (f.stem + EXT[fmt])
                if big_inputs:
                    each = subprocess.run(["node", str(HERE / "sharp_files.js"), str(work / f"sharp_each_{fmt}"), fmt,
                                           *(str(folder / f.name) for f in big_inputs)],
                                          env=env, check=True, capture_output=True, text=True)
                    cpu_ms = json.loads(each.stdout)
                    for f in big_inputs:
                        per_file["sharp"][f].append(cpu_ms[str(folder / f.name)] / 1000)
            for key, source in (("imgworker cmd", folder), ("imgworker big cmd", big_folder if in_range else None)):
                if source is not None:
                    cpu_s[key].append(child(
                        [sys.executable, "-m", "imgworker", "process", "--local", "--format", fmt, "--quality",
                         str(QUALITY), "--out", str(work / f"cmd_{fmt}_{key.split()[1]}"), str(source)],
                        cwd=work, env={**os.environ, "DATA_DIR": str(work / "data")}))
        mean = {k: statistics.fmean(v) for k, v in cpu_s.items() if v}
        print(f"\n[{fmt}] CPU per image (mean of {args.rounds} rounds: "
              + "; ".join(f"{k} {', '.join(f'{x:.3f}' for x in v)}" for k, v in cpu_s.items() if v and "cmd" not in k) + ")")
        scores = {name: {f: score(f, o) for f, o in got.items()} for name, got in outs.items() if got}
        quality = {name: list(by_file.values()) for name, by_file in scores.items()}
        for name, q in quality.items():
            print(_ratio_line(name, mean, q))
        if args.detail:
            for i, f in enumerate(files):
                print(f"    {f.name:40s} " + "  ".join(f"{name} {quality[name][i]:.4f}" for name in quality))
        if "sharp" in mean:
            print(f"  whole commands on the folder: imgworker process --local {mean['imgworker cmd']:.2f} s, "
                  f"node sharp_dir.js {mean['sharp cmd']:.2f} s -> {mean['sharp cmd'] / mean['imgworker cmd']:.2f}x sharp's speed")
            if "sharp big cmd" in mean:
                print(f"  whole commands on the {BIG_SIDE}-{ISSUE_MAX_SIDE} px inputs alone ({len(in_range)}): imgworker {mean['imgworker big cmd']:.2f} s, sharp "
                      f"{mean['sharp big cmd']:.2f} s -> {mean['sharp big cmd'] / mean['imgworker big cmd']:.2f}x "
                      f"sharp's speed (rounds: "
                      + ", ".join(f"{s_ / i_:.2f}x" for s_, i_ in zip(cpu_s['sharp big cmd'], cpu_s['imgworker big cmd']))
                      + ")")
        else:
            print("  sharp: skipped")
        if big_inputs:
            print_big_inputs(big_inputs, in_range, per_file, scores)
    big = next(p for p in files if p.name == "Elephants_5640x3172.jpg")
    print("\npeak RSS of a fresh interpreter on a 5640x3172 JPEG: "
          + ", ".join(f"{fmt} {peak_rss_mb(big, fmt):.0f} MiB" for fmt in args.formats.split(",")))
    shutil.rmtree(work, ignore_errors=True)


def _ratio_line(name: str, mean: dict[str, float], q: list[float], indent: str = "  ") -> str:
    line = f"{indent}{name:13s} {mean[name]:.3f} s/image   SSIM mean {statistics.fmean(q):.4f} min {min(q):.4f}"
    if name != "imgworker":
        line += f"   imgworker's speed = {mean[name] / mean['imgworker']:.2f}x {name}'s"
    return line


def print_big_inputs(big_inputs: list[Path], in_range: list[Path], per_file: dict[str, dict[Path, list[float]]],
                     scores: dict[str, dict[Path, float]]) -> None:
    """The main figures again for the big inputs alone, and for those of
    issue 11's range (``in_range``), then each one's CPU (mean over the
    rounds) and imgworker's speed against sharp's on it."""
    names = [name for name in per_file if all(per_file[name][f] for f in big_inputs) and name in scores]
    each = {name: {f: statistics.fmean(per_file[name][f]) for f in big_inputs} for name in names}
    mean = {name: statistics.fmean(each[name].values()) for name in names}
    sharp_note = "; sharp per file by process.cpuUsage()" if "sharp" in names else "; sharp: skipped"
    print(f"  big inputs, longest side >= {BIG_SIDE} px ({len(big_inputs)} images{sharp_note}):")
    for name in names:
        print(_ratio_line(name, mean, [scores[name][f] for f in big_inputs], indent="    "))
    if in_range and in_range != big_inputs:
        ranged = {name: statistics.fmean(each[name][f] for f in in_range) for name in names}
        print(f"  {BIG_SIDE}-{ISSUE_MAX_SIDE} px alone ({len(in_range)} images):")
        for name in names:
            print(_ratio_line(name, ranged, [scores[name][f] for f in in_range], indent="    "))
    for f in big_inputs:
        line = f"    {f.name:28s} " + "  ".join(f"{name} {each[name][f]:.3f}" for name in names) + " s"
        if "sharp" in names:
            line += f"   imgworker's speed = {each['sharp'][f] / each['imgworker'][f]:.2f}x sharp's"
        print(line)


def variants(files: list[Path], args: argparse.Namespace) -> None:
    """The speed/quality trade-offs: imgworker's pipeline with another JPEG
    draft gap (see imaging._DRAFT_GAP: 1 is libvips' shrink-on-load, which
    scales the JPEG to just cover the box) and with Pillow's own resize in
    place of the fast resizer, interleaved."""
    from imgworker import imaging

    chosen = [(float(v.split(":")[0]), v.endswith(":pillow")) for v in args.variants.split(",")]
    resizer = imaging._fast_resizer()
    out_dir = Path(tempfile.mkdtemp(prefix="pipeline-variants-"))
    print(f"{len(files)} images, imgworker only, {args.rounds} interleaved rounds; JPEG draft gap [: resizer]")
    for fmt in args.formats.split(","):
        cpu_s = {v: 0.0 for v in chosen}
        ssim_s: dict[tuple, list[float]] = {v: [] for v in chosen}
        n = 0
        for rnd in range(args.rounds):
            for f in files:
                for v in chosen if rnd % 2 == 0 else chosen[::-1]:
                    imaging._DRAFT_GAP = v[0]
                    imaging._fast[:] = [None if v[1] else resizer]
                    n += 1
                    t0 = cpu()
                    out = run_imgworker(f, out_dir, fmt, n)
                    cpu_s[v] += cpu() - t0
                    if rnd == 0:
                        ssim_s[v].append(score(f, out))
        for v in chosen:
            per = cpu_s[v] / len(files) / args.rounds
            name = f"{v[0]:g}{':pillow' if v[1] else ''}"
            print(f"  [{fmt}] {name:9s} {per:.3f} s/image  SSIM mean {statistics.fmean(ssim_s[v]):.4f} "
                  f"min {min(ssim_s[v]):.4f}")
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
