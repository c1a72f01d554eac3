"""The web page in real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import Http, free_port, image_bytes
from conftest import ROOT, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # a test dependency (pyproject [test]); never skipped
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: .ci/deps installs it")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page_on(browser, service, tmp_path):
    def open_page(**env):
        port = free_port()
        svc = service("serve", PORT=port, **env)
        http = Http(f"http://127.0.0.1:{port}")
        wait_for(lambda: _up(http), 20, interval=0.1, message="server up")
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(http.base + "/")
        page.wait_for_selector("#server-status.ok")
        return svc, page, errors

    return open_page


def _up(http):
    try:
        return http.get("/api/health").status == 200
    except OSError:
        return False


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


def test_upload_two_images_see_thumbnails_and_links(page_on, tmp_path):
    svc, page, errors = page_on()
    assert page.get_attribute("#drop-zone", "aria-label")
    assert page.locator("label[for=format]").count() == 1 and page.locator("label[for=priority]").count() == 1
    page.set_input_files("#file-input", files(tmp_path, [("one.jpg", image_bytes("JPEG", (2400, 1600))),
                                                          ("two.png", image_bytes("PNG", (800, 600)))]))
    page.focus("#submit")
    page.keyboard.press("Enter")  # keyboard operable
    page.locator("#files .file.done").nth(1).wait_for(timeout=30000)  # (the strict CSP forbids wait_for_function)
    rows = page.locator("#files .file")
    for i in range(2):
        row = rows.nth(i)
        assert row.locator(".thumb img").count() == 1
        link = row.locator(".links a")
        assert link.get_attribute("href").startswith("/api/images/processed_")
        assert link.get_attribute("download") == ("one.webp" if i == 0 else "two.webp")
        assert "saved" in row.locator(".detail").inner_text()
        natural = row.locator(".thumb img").evaluate("img => img.naturalWidth")
        assert natural == 1024 if i == 0 else natural == 800
    shot(page, "web-two-images.png")
    assert not errors, errors


def test_bad_file_shows_its_error(page_on, tmp_path):
    svc, page, errors = page_on()
    page.set_input_files("#file-input", files(tmp_path, [("evil.jpg", b"<?php system($_GET['c']); ?>")]))
    page.click("#submit")
    page.wait_for_selector("#files .file.failed", timeout=20000)
    text = page.locator("#files .file.failed .detail").inner_text()
    assert "Unsupported file type" in text and "UNSUPPORTED_FORMAT" in text
    shot(page, "web-bad-file.png")


def test_server_stopped_processes_in_browser(page_on, tmp_path):
    svc, page, errors = page_on()
    svc.stop()
    page.set_input_files("#file-input", files(tmp_path, [("big.png", image_bytes("PNG", (2048, 1024)))]))
    page.click("#submit")
    page.wait_for_selector("#files .file.done", timeout=20000)
    row = page.locator("#files .file.done")
    assert "Processed in the browser" in row.inner_text()
    assert row.locator(".links a").get_attribute("href").startswith("blob:")
    assert row.locator(".links a").get_attribute("download") == "big.webp"
    assert row.locator(".thumb img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1024, 512]
    assert "unavailable" in page.inner_text("#server-status")
    shot(page, "web-browser-fallback.png")
    page.select_option("#format", "original")  # a PNG stays a PNG
    page.set_input_files("#file-input", files(tmp_path, [("logo.png", image_bytes("PNG", (300, 100)))]))
    page.click("#submit")
    page.locator("#files .file.done").nth(1).wait_for(timeout=20000)
    assert page.locator("#files .file.done .links a").nth(1).get_attribute("download") == "logo.png"
