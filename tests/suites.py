"""The reliability suites (chaos, hostile input, fuzz, load), sized by their
callers: tests/test_suites.py runs a quick pass in every CI run and the full
size under ``-m slow``. Each returns a report dict; the tests assert on it.
"""

from __future__ import annotations

import http.client as http_client
import io
import json
import random
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import psutil
from PIL import Image

from conftest import CORPUS, wait_for
from helpers import Http, free_port, image_bytes, multipart

FINAL = ("completed", "failed", "cancelled")


def photo_like(rng: random.Random, w: int, h: int, fmt: str = "JPEG") -> bytes:
    """A noisy gradient: compresses like a photo, unlike a flat fill."""
    base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    noise = Image.effect_noise((w, h), rng.uniform(10, 60)).convert("RGB")
    im = Image.blend(base, noise, 0.4)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def serve(service: Callable, **env: Any):
    port = free_port()
    svc = service("serve", start=False, PORT=port, **env)
    return svc, Http(f"http://127.0.0.1:{port}")


def healthy(http: Http) -> bool:
    try:
        return http.get("/api/health").status == 200
    except OSError:
        return False


def upload(http: Http, data: bytes, name: str = "img.jpg", path: str = "/api/process/single", **fields):
    return http.upload(path, files=[("image" if path.endswith("single") else "images", name, data)],
                       fields={k: str(v) for k, v in fields.items()})


def peak_rss(proc: psutil.Process) -> dict[str, float]:
    out = {}
    for p in [proc] + proc.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            for line in open(f"/proc/{p.pid}/status"):
                if line.startswith("VmHWM:"):
                    out[f"{cmd.split()[-1] if 'imgworker.worker' not in cmd else 'pool-worker'}:{p.pid}"] = int(line.split()[1]) / 1024
        except (OSError, psutil.Error):
            pass
    return out


# --- chaos ------------------------------------------------------------------------------
def chaos(service: Callable, n_jobs: int, tree_kills: int, worker_kills: int, seed: int = 1) -> dict[str, Any]:
    """Upload n_jobs images while the whole process tree is kill -9'd
    ``tree_kills`` times (restarted each time) and single pool workers are
    killed ``worker_kills`` times; then let everything finish."""
    rng = random.Random(seed)
    svc, http = serve(service, MAX_CONCURRENT_JOBS=2, MAX_QUEUE_SIZE=n_jobs + 10, RATE_LIMIT_MAX_REQUESTS=10**6,
                      MAX_RETRIES=25, RETRY_BASE_DELAY_MS=20, RETRY_MAX_DELAY_MS=300, LOG_LEVEL="warning")
    images = [photo_like(rng, rng.randint(500, 1600), rng.randint(400, 1200), rng.choice(["JPEG", "PNG"]))
              for _ in range(12)]
    svc.start()
    wait_for(lambda: healthy(http), 30, 0.05)
    accepted: list[str] = []
    done = threading.Event()

    def submitter() -> None:
        for i in range(n_jobs):
            while True:
                try:
                    r = upload(http, images[i % len(images)], f"{i}.img")
                except (OSError, http_client.HTTPException):
                    # the service died before or while answering: try again, as a
                    # client would (a job accepted without a reply is still checked below)
                    time.sleep(0.05)
                    continue
                if r.status == 202:
                    accepted.append(r.json["jobId"])
                    break
                assert r.status in (429, 503), (r.status, r.body)
                time.sleep(0.05)
        done.set()

    thread = threading.Thread(target=submitter, daemon=True)
    thread.start()
    kills = ["tree"] * tree_kills + ["worker"] * worker_kills
    rng.shuffle(kills)
    for kind in kills:
        time.sleep(rng.uniform(0.3, 1.5))
        if kind == "tree":
            svc.kill_tree()
            svc.start()
        else:
            pool = [p for p in psutil.Process(svc.proc.pid).children(recursive=True)
                    if "imgworker.worker" in " ".join(p.cmdline())]
            if pool:
                rng.choice(pool).kill()
    thread.join(timeout=300)
    assert done.is_set(), "submitter did not finish"
    wait_for(lambda: healthy(http), 30, 0.1)
    q = svc.store
    wait_for(lambda: q.stats().by_status["completed"] + q.stats().by_status["failed"] >= len(q.list(limit=10**6)),
             240, 0.25, "every job finished")
    rows = q.list(limit=10**6)
    outputs = sorted(p.name for p in svc.storage.processed.iterdir())
    uploads = sorted(p.name for p in svc.storage.uploads.iterdir())
    rss = peak_rss(psutil.Process(svc.proc.pid))
    log = svc.log()
    svc.stop()
    return {
        "accepted": len(accepted), "rows": len(rows),
        "statuses": {s: sum(r.status == s for r in rows) for s in {r.status for r in rows}},
        "lost": sorted(set(accepted) - {r.id for r in rows}),
        "not_completed": [(r.id, r.status, r.error_code) for r in rows if r.status != "completed"],
        "outputs_ok": outputs == sorted(f"processed_{r.id}.webp" for r in rows),
        "outputs_unexpected": sorted(set(outputs) - {f"processed_{r.id}.webp" for r in rows}),
        "outputs_missing": sorted({f"processed_{r.id}.webp" for r in rows} - set(outputs)),
        "orphan_uploads": uploads,  # every job completed: no upload is needed any more
        "tmp_files": sorted(p.name for p in svc.storage.tmp.iterdir()),
        "recovered": log.count("Recovered from a stopped worker or supervisor"),
        "peak_rss_mb": rss,
    }


# --- hostile input ------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def attacks(rng: random.Random, truncations: int) -> list[tuple[str, bytes]]:
    """Generated hostile files: (name, bytes)."""
    out: list[tuple[str, bytes]] = []
    png = image_bytes("PNG", (64, 64))
    out.append(("png_ihdr_60000.png", png[:8] + _png_chunk(b"IHDR", struct.pack(">II", 60000, 60000) + png[24:29]) + png[33:]))
    jpeg = image_bytes("JPEG", (64, 64))
    sof = jpeg.find(b"\xff\xc0")
    out.append(("jpeg_sof_30000.jpg", jpeg[:sof + 5] + struct.pack(">HH", 30000, 30000) + jpeg[sof + 9:]))
    gif = image_bytes("GIF", (64, 64))
    out.append(("gif_screen_65535.gif", gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:]))
    webp = image_bytes("WEBP", (64, 64), lossless=True)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    out.append(("webp_vp8x_canvas.webp", b"RIFF" + struct.pack("<I", len(webp) - 8 + len(vp8x)) + b"WEBP" + vp8x + webp[12:]))
    frames = [Image.new("L", (400, 400), i) for i in range(60)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10)
    out.append(("frames_60x400.gif", buf.getvalue()))
    base = photo_like(rng, 600, 400)
    for i in range(truncations):
        cut = rng.randint(1, len(base) - 1)
        out.append((f"truncated_{cut}.jpg", base[:cut]))
    pbase = image_bytes("PNG", (300, 200))
    for i in range(truncations // 2):
        cut = rng.randint(1, len(pbase) - 1)
        out.append((f"truncated_{cut}.png", pbase[:cut]))
    out.append(("polyglot_zip.jpg", base + b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(500))))
    out.append(("html_in_png.png", pbase + b"<script>alert(1)</script>"))
    exif = Image.Exif()
    exif[0x010E] = "A" * 60000  # ImageDescription: a 60 KB EXIF blob
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, "JPEG", exif=exif.tobytes())
    out.append(("huge_exif.jpg", buf.getvalue()))
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, "JPEG", icc_profile=bytes(rng.randrange(256) for _ in range(200_000)))
    out.append(("huge_garbage_icc.jpg", buf.getvalue()))
    out += [("zero.jpg", b""), ("one.jpg", b"\xff"), ("one.png", b"\x89"), ("magic_only.png", b"\x89PNG\r\n\x1a\n"),
            ("magic_only.gif", b"GIF89a"), ("riff_only.webp", b"RIFF\x00\x00\x00\x00WEBP"),
            ("svg.png", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
            ("exe.jpg", b"MZ\x90\x00" + b"\x00" * 200), ("pdf.gif", b"%PDF-1.4\n%%EOF")]
    return out


def raw_request(port: int, data: bytes, read_timeout: float = 10.0, chunks: list[bytes] | None = None,
                pause: float = 0.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        for chunk in chunks or []:
            time.sleep(pause)
            s.sendall(chunk)
        got = b""
        try:
            while b"\r\n\r\n" not in got or len(got) < 12:
                part = s.recv(65536)
                if not part:
                    break
                got += part
            s.settimeout(0.5)
            while True:
                part = s.recv(65536)
                if not part:
                    break
                got += part
        except socket.timeout:
            pass
    return got.decode("latin-1")


def multipart_attacks(port: int) -> list[tuple[str, str]]:
    """Malformed requests at the HTTP layer: (name, raw response)."""
    img = image_bytes("JPEG", (32, 32))
    body, ctype = multipart(files=[("image", "a.jpg", img)])
    head = "POST /api/process/single HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    results = []

    def send(name: str, headers: str, payload: bytes, **kw: Any) -> None:
        results.append((name, raw_request(port, (head + headers + "\r\n").encode() + payload, **kw)))

    send("no_content_type", f"Content-Length: {len(body)}\r\n", body)
    send("wrong_boundary", f"Content-Type: multipart/form-data; boundary=nope\r\nContent-Length: {len(body)}\r\n", body)
    send("empty_boundary", f"Content-Type: multipart/form-data; boundary=\r\nContent-Length: {len(body)}\r\n", body)
    b2, c2 = multipart(files=[("image", "a.jpg", img), ("image", "b.jpg", img)])
    send("duplicate_image", f"Content-Type: {c2}\r\nContent-Length: {len(b2)}\r\n", b2)
    b3, c3 = multipart(fields={"priority": "9" * 2000}, files=[("image", "a.jpg", img)])
    send("huge_field", f"Content-Type: {c3}\r\nContent-Length: {len(b3)}\r\n", b3)
    b4, c4 = multipart(fields={"format": "webp"})
    send("missing_file", f"Content-Type: {c4}\r\nContent-Length: {len(b4)}\r\n", b4)
    send("truncated_body", f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n", body[: len(body) // 2] ,
         read_timeout=3)
    send("cut_multipart", f"Content-Type: {ctype}\r\nContent-Length: {len(body) - 40}\r\n", body[:-40])
    long_name = body.replace(b'filename="a.jpg"', b'filename="' + b"x" * 5000 + b'.jpg"')
    send("huge_filename", f"Content-Type: {ctype}\r\nContent-Length: {len(long_name)}\r\n", long_name)
    send("bad_content_length", f"Content-Type: {ctype}\r\nContent-Length: banana\r\n", body)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    send("chunked", f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n", chunked)
    pieces = [body[i:i + 200] for i in range(0, len(body), 200)]
    send("slow_upload", f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n", b"", chunks=pieces, pause=0.05)
    return results


# --- fuzz -------------------------------------------------------------------------------------
def seeds() -> list[bytes]:
    rng = random.Random(5)
    out = [image_bytes("JPEG", (120, 90)), image_bytes("PNG", (90, 60)), image_bytes("GIF", (40, 40)),
           image_bytes("WEBP", (70, 50)), image_bytes("PNG", (50, 50), mode="RGBA", color=(1, 2, 3, 4)),
           photo_like(rng, 160, 120), image_bytes("JPEG", (60, 60), mode="CMYK", color=(0, 0, 0, 0))]
    frames = [Image.new("P", (30, 30), i) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out.append(buf.getvalue())
    if (CORPUS / "good").is_dir():
        out += [p.read_bytes() for p in sorted((CORPUS / "good").iterdir()) if p.stat().st_size < 40_000]
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.45 and b:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op < 0.65:  # byte insertions (interesting values)
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)]) for _ in range(rng.randint(1, 16)))
        elif op < 0.8 and len(b) > 64:  # chunk shuffle
            i, j = sorted(rng.sample(range(len(b)), 2))
            piece = b[i:j]
            del b[i:j]
            k = rng.randrange(len(b) + 1)
            b[k:k] = piece
        elif op < 0.9 and len(b) > 8:  # big integers into headers
            i = rng.randrange(min(len(b) - 4, 64))
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00"])
        elif len(b) > 2:  # truncation
            del b[rng.randrange(1, len(b)):]
    return bytes(b)


FUZZ_CHILD = r"""
import json, sys, tempfile
from pathlib import Path
from imgworker.errors import ImageError
from imgworker.imaging import Limits, process
out = tempfile.mkdtemp()
for line in sys.stdin:
    path = line.strip()
    try:
        process(path, out, "f", {}, Limits(max_input_pixels=4_000_000, max_animation_pixels=40_000_000))
        print(json.dumps([path, "ok"]), flush=True)
    except ImageError as exc:
        print(json.dumps([path, exc.code]), flush=True)
"""


def fuzz_pipeline(files: list[Path]) -> dict[str, Any]:
    """Run the pipeline in a child process over ``files``; a crash of the
    child (segfault) is recorded with the input that caused it, then the
    child is restarted on the rest. Any exception other than ImageError
    kills the child too (uncaught), so it is caught here as a crash."""
    import subprocess
    import sys

    outcomes: dict[str, str] = {}
    crashes: list[tuple[str, str]] = []
    todo = [str(f) for f in files]
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", FUZZ_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate("\n".join(todo) + "\n", timeout=600)
        for line in out.splitlines():
            path, code = json.loads(line)
            outcomes[path] = code
        todo = [t for t in todo if t not in outcomes]
        if todo:  # the child died on todo[0]
            crashes.append((todo[0], err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"))
            outcomes[todo.pop(0)] = "CRASH"
    return {"outcomes": outcomes, "crashes": crashes}


# --- load -----------------------------------------------------------------------------------------
def load(service: Callable, submissions: int, clients: int, queue_size: int, rate_limit: int,
         window_ms: int = 2000) -> dict[str, Any]:
    """``submissions`` uploads from ``clients`` threads of one address
    against MAX_QUEUE_SIZE=``queue_size`` and ``rate_limit`` requests per
    ``window_ms``: what each was answered, whether every accepted job
    completed, and the processes' peak memory."""
    svc, http = serve(service, MAX_CONCURRENT_JOBS=2, MAX_QUEUE_SIZE=queue_size, RATE_LIMIT_MAX_REQUESTS=rate_limit,
                      RATE_LIMIT_WINDOW_MS=window_ms, LOG_LEVEL="warning")
    svc.start()
    wait_for(lambda: healthy(http), 30, 0.05)
    rng = random.Random(3)
    images = [photo_like(rng, rng.randint(200, 700), rng.randint(200, 600)) for _ in range(8)]
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    bad: list[Any] = []
    counter = iter(range(submissions))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = upload(http, images[i % len(images)], f"{i}.jpg")
            except (OSError, http_client.HTTPException) as exc:
                with lock:
                    bad.append(("connection", str(exc)))
                continue
            with lock:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 202:
                    accepted.append(r.json["jobId"])
                elif r.status in (429, 503):
                    if not r.getheader("Retry-After") or r.json.get("code") not in ("RATE_LIMITED", "QUEUE_FULL"):
                        bad.append((r.status, r.body[:200]))
                else:
                    bad.append((r.status, r.body[:200]))
            if r.status in (429, 503):
                time.sleep(min(0.2, rng.random() * 0.2))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = svc.store
    wait_for(lambda: all(q.get(j).status in FINAL for j in accepted[-50:]) and
             q.stats().waiting + q.stats().processing == 0, 300, 0.25)
    elapsed = time.monotonic() - t0
    rows = {j: q.get(j) for j in accepted}
    rss = peak_rss(psutil.Process(svc.proc.pid))
    svc.stop()
    return {
        "statuses": statuses, "accepted": len(accepted), "bad": bad, "seconds": round(elapsed, 1),
        "not_completed": [(j, r.status if r else None) for j, r in rows.items() if not r or r.status != "completed"],
        "peak_rss_mb": rss,
    }


# --- slow clients -------------------------------------------------------------------------------
class SlowAttacker:
    """``n`` connections that trickle, from ``sources`` addresses
    (127.0.0.2, 127.0.0.3, ...: one client, or many behind one attacker):
    half send headers one byte at a time, half send complete upload headers
    and then the body one byte at a time. A connection the server closes is
    opened again, so the attacker keeps trying to hold ``n``."""

    HEADERS = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000
    UPLOAD = (b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
              b"Content-Length: 1000000\r\n\r\n")

    def __init__(self, port: int, n: int, interval: float, sources: int = 1):
        self.port, self.n, self.interval, self.sources = port, n, interval, sources
        self.socks: dict[socket.socket, int] = {}  # socket -> bytes sent of its script
        self.stats = {"opened": 0, "closed_by_server": 0, "answers": {}, "connect_errors": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _open(self, i: int) -> None:
        try:
            source = f"127.0.{1 + i % self.sources // 250}.{2 + i % self.sources % 250}"
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2, source_address=(source, 0))
        except OSError:
            self.stats["connect_errors"] += 1
            return
        s.setblocking(False)
        self.socks[s] = 0 if i % 2 else -1  # -1: the upload script, headers not sent yet
        self.stats["opened"] += 1

    def _closed(self, s: socket.socket) -> None:
        try:
            got = s.recv(65536)
        except OSError:
            got = b""
        status = got[9:12].decode("latin-1") if got.startswith(b"HTTP/") else "none"
        self.stats["answers"][status] = self.stats["answers"].get(status, 0) + 1
        self.stats["closed_by_server"] += 1
        del self.socks[s]
        s.close()

    def _drip(self, s: socket.socket) -> None:
        sent = self.socks[s]
        if sent == -1:
            s.send(self.UPLOAD)
            self.socks[s] = 0
        else:
            script = self.HEADERS if len(self.HEADERS) > sent else b"-"
            s.send(script[sent:sent + 1] if sent < len(self.HEADERS) else b"-")
            self.socks[s] = sent + 1

    def run(self) -> None:
        for i in range(self.n):
            self._open(i)
        while not self.stop.wait(self.interval):
            poller = select.poll()  # select() cannot watch descriptors past 1023
            for s in self.socks:
                poller.register(s, select.POLLIN)
            answered = {fd for fd, _ in poller.poll(0)}  # the server only writes to refuse or cut off
            for s in list(self.socks):
                if s.fileno() in answered:
                    self._closed(s)
                    continue
                try:
                    self._drip(s)
                except BlockingIOError:
                    pass
                except OSError:
                    self._closed(s)
            for i in range(self.n - len(self.socks)):
                if self.stop.is_set():
                    break
                self._open(i)

    def __enter__(self) -> "SlowAttacker":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for s in list(self.socks):
            s.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def slow_clients(service: Callable, n_slow: int, seconds: float, interval: float, sources: int = 1,
                 **env: Any) -> dict[str, Any]:
    """Another client's health checks, polls and downloads while ``n_slow``
    trickling connections from ``sources`` addresses are held open: their
    latencies, and what the attacker's connections were answered."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n_slow + 256:  # the attacker's sockets live in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n_slow + 256), hard))
    svc, http = serve(service, LOG_LEVEL="warning", **env)
    svc.start()
    wait_for(lambda: healthy(http), 30, 0.05)
    job_id = upload(http, image_bytes("PNG", (200, 150))).json["jobId"]
    job = wait_for(lambda: (lambda j: j if j["status"] == "completed" else None)(http.get(f"/api/job/{job_id}").json),
                   30, 0.05, "the victim's job")
    url = job["result"]["processedFile"]["url"]
    paths = (("health", "/api/health"), ("poll", f"/api/job/{job_id}"), ("download", url))
    # the same requests without the attack first: what this machine's load
    # alone costs them now (the attack's cost is judged beyond it)
    quiet, quiet_failures = _victim(http, paths, min(seconds, 2.0))
    with SlowAttacker(int(http.port), n_slow, interval, sources) as attacker:
        wait_for(lambda: attacker.stats["opened"] >= n_slow, 60, 0.05, "the attacker's connections")
        held_at_start = len(attacker.socks)
        latencies, failures = _victim(http, paths, seconds)
        held_at_end = len(attacker.socks)
    failures = quiet_failures + failures
    stats = dict(attacker.stats)
    svc.stop()
    quiet_all = [x for v in quiet.values() for x in v]
    everything = [x for v in latencies.values() for x in v]
    return {
        "slow_connections": n_slow, "sources": sources, "requests": len(everything), "failures": failures[:20],
        "failure_count": len(failures),
        "p50_ms": round(percentile(everything, 0.5) * 1000, 1), "p99_ms": round(percentile(everything, 0.99) * 1000, 1),
        "max_ms": round(max(everything) * 1000, 1),
        "p99_ms_by_kind": {k: round(percentile(v, 0.99) * 1000, 1) for k, v in latencies.items()},
        "attacker": stats, "attacker_held": [held_at_start, held_at_end],
        "without_attack": {"requests": len(quiet_all), "p99_ms": round(percentile(quiet_all, 0.99) * 1000, 1)},
    }


def _victim(http: Http, paths: tuple[tuple[str, str], ...], seconds: float) -> tuple[dict[str, list[float]], list[Any]]:
    """Another client's requests (each on a new connection) for ``seconds``:
    latencies by kind, and the failures (anything but 200)."""
    latencies: dict[str, list[float]] = {kind: [] for kind, _ in paths}
    failures: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for kind, path in paths:
            started = time.monotonic()
            try:
                r = http.get(path)
                ok = r.status == 200
            except (OSError, http_client.HTTPException) as exc:
                ok, r = False, exc
            latencies[kind].append(time.monotonic() - started)
            if not ok:
                failures.append((kind, getattr(r, "status", repr(r))))
        time.sleep(0.02)
    return latencies, failures


# --- decoder attacks (issue 15 items 7, 9, 10, 11) -------------------------------------------------
def decoder_attacks(service: Callable, full: bool) -> dict[str, Any]:
    """Upload issue 15's decoder attacks to a real service with default
    limits: each must be refused at upload (422 with a code), quickly and
    without growing the API; files hiding metadata in their structure, sent
    with format=original, must come back without it and well formed."""
    import hostile
    import test_strip
    from imgworker.imaging import Limits
    from imgworker.probe import inspect

    svc, http = serve(service, RATE_LIMIT_MAX_REQUESTS=10**6, MAX_QUEUE_SIZE=10**4)
    svc.start()
    wait_for(lambda: healthy(http), 30, 0.05)
    api = next(p for p in psutil.Process(svc.proc.pid).children(recursive=True) if p.cmdline()[-1] == "api")
    rss_before = api.memory_info().rss / 2**20
    bombs = {
        "jpeg_scans": hostile.jpeg_scan_bomb((7000, 7000) if full else (2000, 2000), 2000 if full else 300),
        "gif_frames_beyond_screen": hostile.gif_frames_beyond_canvas(100, 9999, 39 if full else 3),
        "png_ztxt": hostile.png_ztxt_bomb(64 if full else 20),
        "gif_many_frames": hostile.gif_many_tiny_frames(2_200_000 if full else 200_000),
    }
    checked: dict[str, Any] = {}
    for name, data in bombs.items():
        started = time.monotonic()
        r = upload(http, data, name)
        checked[name] = {"status": r.status, "code": (r.json or {}).get("code"), "kb": len(data) // 1024,
                         "seconds": round(time.monotonic() - started, 2)}
        if r.status == 202:  # valid files (text chunks, many frames): the worker's outcome
            started = time.monotonic()
            job = wait_for(lambda: (lambda j: j if j["status"] in FINAL else None)(
                http.get(f"/api/job/{r.json['jobId']}").json), 60, 0.05, name)
            checked[name].update(job=job["status"], jobCode=job.get("errorCode"),
                                 jobSeconds=round(time.monotonic() - started, 2),
                                 framesIn=(job.get("result") or {}).get("framesIn"))
    peak = int(open(f"/proc/{api.pid}/status").read().split("VmHWM:")[1].split()[0]) / 1024
    stripped: dict[str, Any] = {}
    out_dir = svc.tmp_path / "downloads"
    out_dir.mkdir()
    for name, (fmt, data) in sorted(test_strip.CASES.items()):
        r = upload(http, data, "meta." + fmt, format="original", quality=100)
        job = wait_for(lambda: (lambda j: j if j["status"] in FINAL else None)(http.get(f"/api/job/{r.json['jobId']}").json),
                       30, 0.05, name)
        entry: dict[str, Any] = {"status": job["status"]}
        if job["status"] == "completed":
            body = http.get(job["result"]["processedFile"]["url"]).body
            path = out_dir / f"{len(stripped)}.{fmt}"
            path.write_bytes(body)
            entry["kept_original"] = job["result"]["optimization"]["keptOriginalEncoding"]
            entry["leaked"] = test_strip.SECRET in body
            try:
                inspect(path, Limits())
                entry["well_formed"] = True
            except Exception as exc:
                entry["well_formed"] = str(exc)
        stripped[name] = entry
    healthy_after = healthy(http)
    jobs = svc.store.stats().total
    svc.stop()
    return {"checked": checked, "api_rss_mb": {"before": round(rss_before, 1), "peak": round(peak, 1)},
            "stripped": stripped, "healthy_after": healthy_after, "jobs": jobs}


# --- chunked floods -----------------------------------------------------------------------------
def chunked_flood(service: Callable, seconds: float, connections: int) -> dict[str, Any]:
    """``connections`` clients push endless chunked bodies at GET /api/health
    and POST /api/process/single for ``seconds``, reconnecting whenever
    answered: what the API process wrote to disk meanwhile (/proc wchar:
    Waitress spools bodies over 512 KB to temp files), what the clients
    pushed (into socket buffers, mostly), and the answers ("none": the
    connection was reset before the answer could be read)."""
    svc, http = serve(service, MAX_FILE_SIZE_MB=1, LOG_LEVEL="warning")
    svc.start()
    wait_for(lambda: healthy(http), 30, 0.05)
    api = next(p for p in psutil.Process(svc.proc.pid).children(recursive=True)
               if "api" in " ".join(p.cmdline()))
    heads = [b"GET /api/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n"]
    chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
    lock = threading.Lock()
    totals = {"pushed": 0, "answers": {}}
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < deadline:
            pushed, status = 0, "none"
            try:
                with socket.create_connection(("127.0.0.1", int(http.port)), timeout=5) as s:
                    s.sendall(heads[i % 2])
                    while time.monotonic() < deadline and not select.select([s], [], [], 0)[0]:
                        s.sendall(chunk)
                        pushed += len(chunk)
                    got = s.recv(64)
                    status = got[9:12].decode("latin-1") if got.startswith(b"HTTP/") else "none"
            except OSError:
                pass
            with lock:
                totals["pushed"] += pushed
                totals["answers"][status] = totals["answers"].get(status, 0) + 1

    before = api.io_counters().write_chars
    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = api.io_counters().write_chars - before
    healthy_after = healthy(http)
    tmp_left = [p.name for p in svc.storage.tmp.iterdir()]
    rss = api.memory_info().rss
    svc.stop()
    return {"seconds": seconds, "connections": connections, "pushed_mb": round(totals["pushed"] / 2**20, 1),
            "api_written_mb": round(written / 2**20, 1),
            "written_mb_per_connection": round(written / 2**20 / max(1, sum(totals["answers"].values())), 2), "answers": totals["answers"], "healthy_after": healthy_after,
            "tmp_left": tmp_left, "api_rss_mb": round(rss / 2**20, 1)}
