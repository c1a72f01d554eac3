"""Issue 15's decoder attacks at full size, each in a fresh process: CPU
seconds and peak RSS of the upload check (what the API runs) and of the
whole pipeline (what a worker runs), plus the metadata cases of the
keep-the-original path.

    .venv/bin/python bench/hostile_bench.py             # this checkout
    IMGWORKER_SRC=/path/to/old/tree .venv/bin/python bench/hostile_bench.py   # another tree, same files

Each case runs in a child with the address space capped at 4 GB and a
wall-clock limit, so a bomb that gets through shows as a figure, not a hang.
Peak RSS is the child's VmHWM (ru_maxrss would carry the parent's peak
across exec).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import hostile  # noqa: E402

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from imgworker.errors import ImageError
from imgworker.imaging import Limits, probe, process
what, path, out = sys.argv[1:4]
started, cpu = time.monotonic(), time.process_time()
try:
    if what == "check":
        probe(path, Limits())
    else:
        process(path, out, "b", {"format": "original"} if what == "original" else {}, Limits())
    outcome = "accepted" if what == "check" else "completed"
except ImageError as exc:
    outcome = exc.code
except MemoryError:
    outcome = "MemoryError"
print(json.dumps({"outcome": outcome, "cpu_s": round(time.process_time() - cpu, 2),
                  "wall_s": round(time.monotonic() - started, 2),
                  "peak_rss_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024}))
"""


def run(what: str, path: Path, out: Path, src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    try:
        # cwd outside any checkout: `python -c` puts the cwd first on sys.path
        proc = subprocess.run([sys.executable, "-c", CHILD, what, str(path), str(out)], env=env, cwd=path.parent,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout after 300 s"}
    if proc.returncode:
        return {"outcome": f"crashed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout)


def main() -> None:
    src = os.environ.get("IMGWORKER_SRC", str(HERE.parent))
    work = Path(tempfile.mkdtemp())
    cases = {
        "jpeg_2000_scans_7000x7000": hostile.jpeg_scan_bomb((7000, 7000), 2000),
        "gif_39_frames_9999x9999_on_100x100": hostile.gif_frames_beyond_canvas(100, 9999, 39),
        "png_ztxt_64x1MB": hostile.png_ztxt_bomb(64),
        "gif_2200000_frames_1x1": hostile.gif_many_tiny_frames(2_200_000),
    }
    print(f"# code from {src}")
    for name, data in cases.items():
        path = work / name
        path.write_bytes(data)
        row = {"size_kb": len(data) // 1024, "check": run("check", path, work, src),
               "pipeline": run("pipeline", path, work, src)}
        print(json.dumps({name: row}))
        path.unlink()
    # the keep-the-original path: how many hidden metadata cases leak
    import test_strip

    from imgworker.errors import ImageError
    from imgworker.imaging import Limits
    from imgworker.probe import inspect

    leaks, broken = [], []
    for name, (fmt, data) in sorted(test_strip.CASES.items()):
        path = work / "meta"
        path.write_bytes(data)
        out = work / "out"
        out.mkdir(exist_ok=True)
        got = run("original", path, out, src)
        produced = list(out.iterdir())
        body = produced[0].read_bytes() if produced else b""
        if test_strip.SECRET in body:
            leaks.append(name)
        if produced:
            try:  # well formed to its end (this checkout's structural walk)
                inspect(produced[0], Limits())
            except ImageError as exc:
                broken.append(f"{name}: {exc.message}")
        for p in produced:
            p.unlink()
        if got["outcome"] != "completed":
            broken.append(f"{name}: {got['outcome']}")
    print(json.dumps({"metadata_cases": len(test_strip.CASES), "leaked": leaks, "broken_output": broken}))


if __name__ == "__main__":
    main()
