"""The web page and the dashboard in real headless Chromium (Debian's package,
driven by Playwright), against a real `imgworker serve`, under the API's
strict Content-Security-Policy (a violation is a console error: asserted
absent). Screenshots go to test-artifacts/."""

from __future__ import annotations

import io
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import hostile
from helpers import Http, free_port, image_bytes, noisy_jpeg
from conftest import ROOT, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DONE = ".card[data-state=done]"


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # a test dependency (pyproject [test]); never skipped
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: .ci/deps installs it")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Site:
    """A served imgworker and a Chromium page on it."""

    def __init__(self, browser, service, env, path="/", init=None):
        self.port = free_port()
        self.env = env
        self.service = service
        self.svc = service("serve", PORT=self.port, **env)
        self.http = Http(f"http://127.0.0.1:{self.port}")
        wait_for(self.up, 20, interval=0.1, message="server up")
        self.page = browser.new_page(viewport={"width": 1100, "height": 800})
        if init:
            self.page.add_init_script(init)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(self.http.base + path)

    def up(self):
        try:
            return self.http.get("/api/health").status == 200
        except OSError:
            return False

    def restart(self):
        """A new serve on the same port and data directory (after a kill)."""
        self.svc = self.service("serve", PORT=self.port, **self.env)
        return self.svc


@pytest.fixture
def site(browser, service):
    made = []

    def open_site(path="/", init=None, **env):
        s = Site(browser, service, env, path, init)
        made.append(s)
        if path == "/":
            s.page.wait_for_selector("#server-status.ok, #server-status.busy")
        return s

    yield open_site
    for s in made:
        s.page.close()


def files(tmp_path, specs):
    out = []
    for name, data in specs:
        p = tmp_path / name
        p.write_bytes(data)
        out.append(str(p))
    return out


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_pick_remove_upload_progress_compare_download_all(site, tmp_path, corpus):
    s = site()
    page = s.page
    assert page.get_attribute("#drop-zone", "aria-label")
    assert page.locator("label[for=format]").count() == 1 and page.locator("label[for=priority]").count() == 1
    assert "workers busy" in page.inner_text("#server-status")  # live status, not a fixed "available"
    page.set_input_files("#file-input", files(tmp_path, [
        ("waterfall.jpg", (corpus / "good" / "Landscape_0.jpg").read_bytes()),   # 1800x1200
        ("flower.webp", (corpus / "good" / "flower.webp").read_bytes()),         # 480x360
        ("oops.gif", image_bytes("GIF", (64, 64))),
        ("evil.jpg", b"<?php system($_GET['c']); ?>"),
    ]))
    cards = page.locator("#files .card")
    assert cards.count() == 4 and page.inner_text("#submit") == "Process 4 images"
    wait_for(lambda: cards.nth(0).locator(".thumb img").evaluate("i => i.complete && i.naturalWidth") == 1800, 5,
             message="preview of a picked file")
    shot(page, "web-picked.png")
    page.click("#files .card:nth-child(3) .remove")  # changed my mind about oops.gif
    assert cards.count() == 3 and page.inner_text("#submit") == "Process 3 images"
    page.focus("#submit")
    page.keyboard.press("Enter")  # keyboard operable
    page.wait_for_selector("#overall.finished", timeout=30000)
    assert [c.get_attribute("data-state") for c in cards.all()] == ["done", "done", "failed"]
    summary = page.inner_text("#summary-text")
    assert summary.startswith("2 of 3 done · 1 failed · saved ") and "%" in summary
    assert page.locator("#overall-progress").evaluate("p => p.value") == 100
    for i, (name, width) in enumerate([("waterfall.webp", 1024), ("flower.webp", 480)]):
        link = cards.nth(i).locator("a.download")
        assert link.get_attribute("href").startswith("/api/images/processed_")
        assert link.get_attribute("download") == name
        assert cards.nth(i).locator(".thumb img").evaluate("i => i.naturalWidth") == width
        assert "saved" in cards.nth(i).locator(".detail").inner_text()
    bad = cards.nth(2)
    assert "Unsupported file type" in bad.inner_text() and "UNSUPPORTED_FORMAT" in bad.inner_text()
    assert not bad.locator(".retry").is_visible()  # a file judged broken would only fail again
    assert not bad.locator(".download").is_visible()
    shot(page, "web-batch-done.png")
    # before / after
    cards.nth(0).locator(".compare").click()
    page.wait_for_selector("#compare-dialog[open]")
    page.fill("#compare-range", "30")
    assert "inset(0px 70%" in page.locator(".before-clip").evaluate("e => getComputedStyle(e).clipPath")
    shot(page, "web-compare.png")
    page.click("#compare-close")
    # download all: one zip with both results, named after the originals
    with page.expect_download() as download:
        page.click("#download-all")
    archive = zipfile.ZipFile(download.value.path())
    assert archive.namelist() == ["waterfall.webp", "flower.webp"]
    assert Image.open(io.BytesIO(archive.read("waterfall.webp"))).size == (1024, 683)
    # phone width: no horizontal scrolling, the cards still readable
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "web-phone.png")
    page.click("#clear")
    assert cards.count() == 0 and page.is_hidden("#overall")
    assert not s.errors, s.errors


def test_retry_a_failed_file(site, tmp_path):
    """A job that failed (timed out with no retries left) is retried from its
    card once the operator has raised the timeout (SIGHUP reload)."""
    (tmp_path / ".env").write_text("JOB_TIMEOUT_MS=50\n")
    s = site(MAX_RETRIES=0, MAX_CONCURRENT_JOBS=1)
    page = s.page
    page.set_input_files("#file-input", files(tmp_path, [("slow.jpg", noisy_jpeg())]))
    page.click("#submit")
    card = page.locator("#files .card")
    page.wait_for_selector(".card[data-state=failed]", timeout=30000)
    assert "TIMEOUT" in card.inner_text()
    shot(page, "web-failed.png")
    (tmp_path / ".env").write_text("JOB_TIMEOUT_MS=30000\n")
    s.svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: s.svc.log().count("JOB_TIMEOUT_MS 50 -> 30000") == 2, 10, message="reloaded")
    card.locator(".retry").click()
    page.wait_for_selector(DONE, timeout=30000)
    (job,) = s.svc.store.list()
    assert job.status == "completed"  # the same job, retried: not a second upload
    assert card.locator("a.download").get_attribute("href") == f"/api/images/processed_{job.id}.webp"


def test_cancel_a_waiting_file(site, tmp_path):
    s = site(MEMORY_PAUSE_PERCENT=0, MEMORY_RESUME_PERCENT=0)  # paused: jobs wait
    page = s.page
    page.set_input_files("#file-input", files(tmp_path, [("a.png", image_bytes("PNG", (50, 50)))]))
    page.click("#submit")
    card = page.locator("#files .card")
    card.locator(".cancel").wait_for(timeout=20000)
    assert "paused" in page.inner_text("#server-status").lower()
    card.locator(".cancel").click()
    page.wait_for_selector(".card[data-state=cancelled]")
    assert s.svc.store.list()[0].status == "cancelled"


@pytest.mark.parametrize("comes_back", [True, False], ids=["server-restarted", "server-stays-down"])
def test_server_killed_mid_batch_no_file_processed_twice(site, tmp_path, comes_back):
    """The server dies with part of a batch done: the finished files are kept
    (never redone); the page waits for the server and carries on when it
    comes back, or finishes the rest in the browser when it does not."""
    s = site(MAX_CONCURRENT_JOBS=1, init="localStorage.setItem('imgworker.reconnectMs', '2000')" if not comes_back
             else None)
    page = s.page
    data = noisy_jpeg()
    page.set_input_files("#file-input", files(tmp_path, [(f"p{i}.jpg", data) for i in range(6)]))
    page.click("#submit")
    page.locator(DONE).nth(1).wait_for(timeout=60000)
    s.svc.kill_tree()
    if comes_back:
        page.wait_for_selector(".card[data-state=waiting]", timeout=10000)
        shot(page, "web-waiting-for-server.png")
        s.restart()
    page.wait_for_selector("#overall.finished", timeout=90000)
    cards = page.locator("#files .card")
    assert [c.get_attribute("data-state") for c in cards.all()] == ["done"] * 6
    hrefs = [c.locator("a.download").get_attribute("href") for c in cards.all()]
    server_done = [h for h in hrefs if h.startswith("/api/images/")]
    assert len(set(hrefs)) == 6 and len(server_done) >= 2
    assert page.inner_text("#summary-text").startswith("6 of 6 done")
    if comes_back:
        assert len(server_done) == 6 and page.locator(".tag.browser:visible").count() == 0
        jobs = s.svc.store.list(limit=100)
        assert len(jobs) == 6 and {j.status for j in jobs} == {"completed"}
    else:
        in_browser = page.locator(".card:has(.tag.browser:visible)")
        assert in_browser.count() == 6 - len(server_done) and in_browser.count() >= 1
        assert all(h.startswith("blob:") for h in hrefs if h not in server_done)
        assert page.is_visible("#fallback-note")
        shot(page, "web-server-died.png")


def test_server_stopped_processes_in_browser(site, tmp_path):
    s = site()
    page = s.page
    s.svc.stop()
    page.wait_for_selector("#server-status.down", timeout=15000)  # live status: no stale "ready"
    assert "unavailable" in page.inner_text("#server-status")
    page.set_input_files("#file-input", files(tmp_path, [("big.png", image_bytes("PNG", (2048, 1024))),
                                                          ("scan.bmp", image_bytes("BMP", (40, 40)))]))
    page.click("#submit")
    page.wait_for_selector("#overall.finished", timeout=20000)
    done, bmp = page.locator("#files .card").all()
    assert done.get_attribute("data-state") == "done" and done.locator(".tag.browser").is_visible()
    assert done.locator("a.download").get_attribute("href").startswith("blob:")
    assert done.locator("a.download").get_attribute("download") == "big.webp"
    assert done.locator(".thumb img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1024, 512]
    # the browser refuses what the server would refuse: identified by its bytes
    assert bmp.get_attribute("data-state") == "failed" and "UNSUPPORTED_FORMAT" in bmp.inner_text()
    assert page.locator(".card .tag.browser:visible").count() == 2  # each card tagged once
    assert page.locator("#fallback-note").count() == 1 and page.is_visible("#fallback-note")
    shot(page, "web-browser-fallback.png")
    page.select_option("#format", "original")  # a PNG stays a PNG
    page.set_input_files("#file-input", files(tmp_path, [("logo.png", image_bytes("PNG", (300, 100)))]))
    page.click("#submit")
    page.locator(DONE).nth(1).wait_for(timeout=20000)
    assert page.locator(DONE).nth(1).locator("a.download").get_attribute("download") == "logo.png"


def test_dashboard_numbers_move_while_jobs_run(site, tmp_path):
    """The operator dashboard under the strict CSP: tiles, queue, workers and
    charts follow a batch while it runs; a failure is listed with a retry."""
    # each job at least 0.4 s: the batch spans two of the page's 2 s refreshes
    # however fast the pipeline gets (a photo alone takes 0.12 s now)
    s = site(path="/dashboard", MAX_CONCURRENT_JOBS=1, IMGWORKER_TEST_SLEEP_MS=400)
    page = s.page
    page.wait_for_selector("#service-state.ok", timeout=20000)
    wait_for(lambda: page.locator("#worker-rows tr td.state-idle").count() == 1, 20, message="the pool row")
    assert page.inner_text("#kpi-completed") == "0" and page.inner_text("#kpi-waiting-sub") == "of 100 max"
    assert "claiming pauses at 90%" in page.inner_text("#memory-text")
    photo = noisy_jpeg()
    # sound structure, corrupt deflate stream: accepted, then failed by the worker
    r = s.http.upload("/api/process/batch", files=[("images", f"p{i}.jpg", photo) for i in range(10)]
                      + [("images", "cut.png", hostile.png_corrupt_deflate())])
    assert r.status == 202 and len(r.json["jobs"]) == 11
    seen = {"completed": set(), "waiting": set(), "busy": False}

    def finished():
        seen["completed"].add(page.inner_text("#kpi-completed"))
        seen["waiting"].add(page.inner_text("#kpi-waiting"))
        seen["busy"] |= page.locator("#worker-rows td.state-busy").count() > 0
        return page.inner_text("#kpi-completed") == "10" and page.inner_text("#kpi-failed") == "1"

    wait_for(finished, 60, interval=0.1, message="the dashboard shows the batch done")
    moving = {int(v) for v in seen["completed"]}
    assert any(0 < v < 10 for v in moving), moving          # seen while the batch ran, not only before and after
    assert any(int(v) > 0 for v in seen["waiting"]) and seen["busy"]
    wait_for(lambda: int(page.get_attribute("#throughput-chart", "data-bars") or 0) >= 1, 5, message="a bar")
    assert page.locator("#time-chart circle").count() >= 1
    assert page.inner_text("#status-completed") == "10"
    failure = page.locator("#failure-rows tr")
    assert failure.count() == 1 and "INVALID_IMAGE" in failure.inner_text() and "cut.png" in failure.inner_text()
    shot(page, "dashboard.png")
    failure.locator("button.retry").click()
    page.wait_for_selector("#failure-rows button:has-text('Queued')")
    wait_for(lambda: "Job sent back to the queue by request" in s.svc.log(), 10, message="the retry reached the API")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "dashboard-phone.png")
    assert not s.errors, s.errors


def test_formats_from_health_and_auto_picks_what_this_browser_shows(site, tmp_path):
    """The format menu and the file picker follow /api/health; "auto" tells
    the server what Chromium decodes (AVIF), so the job comes back as AVIF."""
    s = site(SUPPORTED_FORMATS="jpeg,png,avif")
    page = s.page
    values = page.locator("#format option").evaluate_all("options => options.map(o => o.value)")
    assert {"webp", "jpeg", "png", "avif", "original", "auto"} <= set(values)
    accept = page.get_attribute("#file-input", "accept")
    assert "image/avif" in accept and "image/webp" not in accept  # WebP is not in SUPPORTED_FORMATS here
    page.select_option("#format", "auto")
    page.set_input_files("#file-input", files(tmp_path, [("photo.jpg", image_bytes("JPEG", (300, 200)))]))
    page.click("#submit")
    page.wait_for_selector(DONE, timeout=30000)
    assert page.locator(f"{DONE} a.download").get_attribute("download") == "photo.avif"
    assert not s.errors, s.errors
