"""The Python client and `imgworker process` against a real `imgworker serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from helpers import free_port, image_bytes
from conftest import wait_for
from imgworker.client import ServerApiClient


@pytest.fixture
def server(service):
    def start(**env):
        port = free_port()
        svc = service("serve", PORT=port, **env)
        client = ServerApiClient(f"http://127.0.0.1:{port}", poll_interval=0.05, max_poll_time=30)
        wait_for(lambda: client.check_server_health(refresh=True), 20, interval=0.1, message="server up")
        return svc, client

    return start


def write(tmp_path, name, data):
    p = tmp_path / "in" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def test_server_path(server, tmp_path):
    svc, client = server()
    src = write(tmp_path, "photo.jpg", image_bytes("JPEG", (2000, 1500)))
    r = client.process_file(src, tmp_path / "out")
    assert r.ok and r.source == "server" and r.fallback_reason is None
    assert r.output == str(tmp_path / "out" / "photo.webp")
    assert Image.open(r.output).size == (1024, 768)
    assert svc.queue.stats()["completedJobs"] == 1


def test_fallback_when_port_closed(tmp_path):
    client = ServerApiClient(f"http://127.0.0.1:{free_port()}", poll_interval=0.05)
    assert client.check_server_health() is False
    src = write(tmp_path, "photo.png", image_bytes("PNG", (1500, 300)))
    r = client.process_file(src, tmp_path / "out", {"format": "jpeg"})
    assert r.ok and r.source == "local" and "unavailable" in r.fallback_reason
    out = Image.open(r.output)
    assert out.format == "JPEG" and out.size == (1024, 205)


def test_fallback_on_503_queue_full(server, tmp_path):
    svc, client = server(MAX_QUEUE_SIZE=1, MEMORY_PAUSE_PERCENT=0, MEMORY_RESUME_PERCENT=0)
    first = write(tmp_path, "a.png", image_bytes("PNG", (50, 50)))
    client.max_poll_time = 0.5  # the paused server never finishes this one
    r1 = client.process_file(first, tmp_path / "out")
    assert r1.source == "local" and "not finished" in r1.fallback_reason  # slow server: local
    client.max_poll_time = 30
    second = write(tmp_path, "b.png", image_bytes("PNG", (60, 60)))
    r2 = client.process_file(second, tmp_path / "out")
    assert r2.ok and r2.source == "local" and "503" in r2.fallback_reason and "QUEUE_FULL" in r2.fallback_reason


def test_no_fallback_on_415(server, tmp_path):
    svc, client = server()
    src = write(tmp_path, "fake.jpg", image_bytes("BMP"))
    r = client.process_file(src, tmp_path / "out")
    assert not r.ok and r.source == "server" and r.code == "UNSUPPORTED_FORMAT"
    assert not (tmp_path / "out").exists()


def test_429_waits_for_retry_after(server, tmp_path):
    svc, client = server(RATE_LIMIT_MAX_REQUESTS=1, RATE_LIMIT_WINDOW_MS=1500)
    a = write(tmp_path, "a.png", image_bytes("PNG", (40, 40)))
    b = write(tmp_path, "b.png", image_bytes("PNG", (40, 40)))
    assert client.process_file(a, tmp_path / "out").source == "server"
    started = time.monotonic()
    r = client.process_file(b, tmp_path / "out")
    assert r.ok and r.source == "server" and time.monotonic() - started >= 0.5


def test_batch_progress_order(server, tmp_path):
    svc, client = server(MAX_CONCURRENT_JOBS=2)
    files = [write(tmp_path, f"p{i}.png", image_bytes("PNG", (1200, 800 + i))) for i in range(3)]
    files.insert(1, write(tmp_path, "bad.png", b"not a png at all"))
    events: list[tuple[str, str]] = []
    results = client.process_batch(files, tmp_path / "out", progress=lambda f, stage, d: events.append((f, stage)))
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].code == "UNSUPPORTED_FORMAT"
    for f, r in zip(files, results):
        stages = [s for name, s in events if name == str(f)]
        if r.ok:
            assert stages[0] == "uploading" and stages[1] == "queued" and stages[-1] == "done"
            assert set(stages) <= {"uploading", "queued", "processing", "done"}
            assert Image.open(r.output).width == 1024
        else:
            assert stages == ["uploading", "failed"]


def run_cli(tmp_path, *args, env=None):
    full = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "clientdata"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgworker", "process", *args], cwd=tmp_path,
                          capture_output=True, text=True, env=full, timeout=120)


def test_cli_folder_of_mixed_files(server, tmp_path):
    svc, client = server()
    folder = tmp_path / "in"
    write(tmp_path, "good1.jpg", image_bytes("JPEG", (1600, 900)))
    write(tmp_path, "sub/good2.png", image_bytes("PNG", (300, 200)))
    write(tmp_path, "broken.png", image_bytes("PNG", (300, 300))[:100])
    write(tmp_path, "notes.txt", b"ignored: not an image name")
    out = tmp_path / "out"
    r = run_cli(tmp_path, str(folder), "--server", client.server_url, "--out", str(out), "--format", "jpeg")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Processing good1.jpg on server... done" in r.stdout and "Processing good2.png on server... done" in r.stdout
    assert "Processing broken.png on server... failed" in r.stdout and "INVALID_IMAGE" in r.stdout
    assert "2 processed, 1 failed" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["good1.jpg", "good2.jpg"]
    # again: nothing is overwritten silently, and --json gives one object per file
    r = run_cli(tmp_path, str(folder / "good1.jpg"), "--server", client.server_url, "--out", str(out), "--json",
                "--format", "jpeg")
    assert r.returncode == 0
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["source"] == "server" and result["output"].endswith("good1-1.jpg")


def test_cli_local_and_dead_server(tmp_path):
    write(tmp_path, "a.png", image_bytes("PNG", (100, 100)))
    r = run_cli(tmp_path, str(tmp_path / "in"), "--server", f"http://127.0.0.1:{free_port()}", "--out",
                str(tmp_path / "out"))
    assert r.returncode == 0 and "Processing a.png on client (server unavailable)... done" in r.stdout
    r = run_cli(tmp_path, str(tmp_path / "in" / "a.png"), "--local", "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "Processing a.png on client (requested)... done" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-1.webp", "a.webp"]
    assert run_cli(tmp_path, str(tmp_path / "missing.jpg"), "--local").returncode == 1
