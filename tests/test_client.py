"""The Python client and `imgworker process` against a real `imgworker serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from helpers import free_port, image_bytes, noisy_jpeg
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
    assert svc.store.stats().completed == 1


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
    assert r1.ok and r1.source == "local" and "did not finish it in 0.5 s" in r1.fallback_reason
    # the job given up on is cancelled on the server, not left to run later for nobody
    (job,) = svc.store.list()
    assert job.status == "cancelled" and not client.abandoned
    svc.submit(image_bytes("PNG", (20, 20)))  # fills the queue (size 1)
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


def test_cli_local_loads_neither_the_stores_nor_http(tmp_path):
    """`process --local` is a whole command timed against sharp's: it starts
    without the database layer or http.client/ssl (about 25 ms of CPU)."""
    write(tmp_path, "a.png", image_bytes("PNG", (40, 30)))
    script = ("import sys; from imgworker import cli; code = cli.main(sys.argv[1:]); "
              "print(sorted(m for m in sys.modules if m.startswith(('imgworker.store', 'imgworker.db', 'http.client',"
              " 'sqlite3', 'ssl'))))")
    r = subprocess.run([sys.executable, "-c", script, "process", "--local", str(tmp_path / "in"), "--out",
                        str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "clientdata")})
    assert r.returncode == 0 and (tmp_path / "out" / "a.webp").is_file(), r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def start_cli(tmp_path, *args):
    full = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "clientdata")}
    return subprocess.Popen([sys.executable, "-m", "imgworker", "process", *args], cwd=tmp_path, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("comes_back", [True, False], ids=["server-restarted", "server-stays-down"])
def test_cli_server_killed_mid_batch_no_file_processed_twice(server, service, tmp_path, comes_back):
    """Bug 3: the files the server finished before it died are kept (not redone
    as photo-1.webp); the rest wait for the server to come back, or are done
    here when it does not, with the abandoned server jobs reported."""
    svc, client = server(MAX_CONCURRENT_JOBS=1)
    data = noisy_jpeg()
    for i in range(8):
        write(tmp_path, f"p{i}.jpg", data)
    out = tmp_path / "out"
    proc = start_cli(tmp_path, str(tmp_path / "in"), "--server", client.server_url, "--out", str(out),
                     "--wait", "30" if comes_back else "1")
    wait_for(lambda: out.is_dir() and len(list(out.glob("*.webp"))) >= 2, 60, message="two files done")
    svc.kill_tree()
    if comes_back:
        port = client.server_url.rsplit(":", 1)[1]
        again = service("serve", PORT=port, MAX_CONCURRENT_JOBS=1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.webp" for i in range(8)]  # never p0-1.webp
    lines = [line for line in stdout.splitlines() if line.startswith("Processing ")]
    assert len(lines) == 8
    assert sum("on server... done" in line for line in lines) >= 2
    if comes_back:
        assert "waiting up to 30 s" in stderr and "Server is back" in stderr
        assert all("on server... done" in line for line in lines)
        jobs = again.store.list(limit=100)
        assert len(jobs) == 8 and {j.status for j in jobs} == {"completed"}
    else:
        assert any("on client (server unavailable" in line for line in lines)
        assert "could not be cancelled" in stderr  # the server is gone: say which jobs were left there
        assert "8 processed (" in stdout


def test_cli_batch_size_follows_the_server_limit(server, tmp_path):
    """Bug 4: the CLI sends at most the server's BATCH_MAX_FILES per request."""
    svc, client = server(BATCH_MAX_FILES=5)
    for i in range(12):
        write(tmp_path, f"s{i:02d}.png", image_bytes("PNG", (40 + i, 30)))
    r = run_cli(tmp_path, str(tmp_path / "in"), "--server", client.server_url, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 processed, 0 failed" in r.stdout
    batches = {j.batch_id for j in svc.store.list(limit=100)}
    assert len(batches) == 3  # 5 + 5 + 2


def test_server_url_without_scheme(server, tmp_path):
    """Bug 5: `--server localhost:3001` means http, and nonsense is a usage error, not a traceback."""
    svc, client = server()
    write(tmp_path, "a.png", image_bytes("PNG", (40, 40)))
    bare = client.server_url.removeprefix("http://")
    r = run_cli(tmp_path, str(tmp_path / "in"), "--server", bare, "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "on server... done" in r.stdout, r.stdout + r.stderr
    for bad in ("ftp://host", "http://", "localhost:port"):
        r = run_cli(tmp_path, str(tmp_path / "in"), "--server", bad)
        assert r.returncode == 2 and "--server" in r.stderr and "Traceback" not in r.stderr, bad


def test_poll_values_in_milliseconds_are_refused():
    """Bug 10: ServerApiClient(url, 500, 180000) as ported from the original
    (milliseconds) is refused with a sentence, not a client that polls every 500 s."""
    with pytest.raises(ValueError, match="seconds.*pass 0.5"):
        ServerApiClient("http://127.0.0.1:3001", 500, 180)
    with pytest.raises(ValueError, match="pass 180"):
        ServerApiClient("http://127.0.0.1:3001", 0.5, 180000)
    assert ServerApiClient("127.0.0.1:3001", 0.5, 180).server_url == "http://127.0.0.1:3001"


def test_cli_identifies_files_by_their_bytes(tmp_path):
    """Bug 7: in a folder every regular file is identified by its bytes; what
    is not an accepted image is reported as skipped, with the reason."""
    write(tmp_path, "scan.tif", image_bytes("TIFF", (30, 30)))
    write(tmp_path, "noextension", image_bytes("PNG", (30, 30)))
    write(tmp_path, "photo.jpg.bak", image_bytes("JPEG", (30, 30)))
    write(tmp_path, "notes.txt", b"hello")
    write(tmp_path, ".hidden.png", image_bytes("PNG", (30, 30)))
    r = run_cli(tmp_path, str(tmp_path / "in"), "--local", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["noextension.webp", "photo.jpg.webp"]
    assert "Skipping " in r.stdout and "scan.tif: TIFF is not accepted" in r.stdout
    assert "notes.txt: not an image" in r.stdout and ".hidden" not in r.stdout
    assert "2 processed on this machine, 0 failed, 2 skipped" in r.stdout


def test_cli_output_is_human(server, tmp_path):
    """Bug 11: human sizes, one line per file, a summary; a missing file is
    said plainly; `| head` ends without a traceback."""
    svc, client = server()
    write(tmp_path, "big.png", image_bytes("PNG", (2000, 1000), color=(10, 200, 30)))
    r = run_cli(tmp_path, str(tmp_path / "in" / "big.png"), str(tmp_path / "nonexistent.jpg"),
                "--server", client.server_url, "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "Skipping nonexistent.jpg: no such file" in r.stdout and "(None)" not in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("Processing big.png"))
    assert re.search(r"\(\d+\.\d (KB|B|MB) -> \d+(\.\d)? (KB|B|MB), (saved \d+%|\d+\.\d (KB|MB) larger)\)$", line), line
    assert re.search(r"1 processed, 1 failed; .* saved .*%\)", r.stdout.splitlines()[-1])
    assert "bytes" not in r.stdout
    stats = subprocess.run(f"{sys.executable} -m imgworker stats | head -1", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, "DATA_DIR": str(svc.tmp_path / "data")})
    assert stats.returncode == 0 and "Traceback" not in stats.stderr and "BrokenPipe" not in stats.stderr


def test_cli_local_quality_range_matches_the_server(tmp_path):
    """Bug 12: `--local --quality 0` is refused as the server refuses it."""
    write(tmp_path, "a.png", image_bytes("PNG", (30, 30)))
    r = run_cli(tmp_path, str(tmp_path / "in"), "--local", "--quality", "0")
    assert r.returncode == 2 and "from 1 to 100" in r.stderr


def test_cli_progress_bar_never_glues_to_other_lines(tmp_path):
    """Bug 11: on a terminal the bar is cleared before any other line (file
    lines, notices, the summary), so nothing is printed after a bar on its line."""
    import pty

    for name in ("a.png", "b.png"):
        write(tmp_path, name, image_bytes("PNG", (300, 200)))
    write(tmp_path, "notes.txt", b"not an image")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "process", str(tmp_path / "in"), "--out",
                             str(tmp_path / "out"), "--server", f"127.0.0.1:{free_port()}", "--wait", "0"],
                            cwd=tmp_path, stdout=follower, stderr=follower, env={**os.environ, "DATA_DIR": str(tmp_path / "d")})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert "[" in text and "] 0/2 " in text  # the bar was drawn
    for line in text.replace("\r\n", "\n").split("\n"):
        visible = line.rsplit("\x1b[2K", 1)[-1]  # what remains on screen after the last clear
        assert not re.search(r"\] \d+/\d+ .*(Processing|Skipping|Server|processed)", visible), repr(line)
    assert "2 processed on this machine, 0 failed, 1 skipped" in text
