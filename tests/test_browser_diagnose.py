"""The Diagnose page in a real browser: `streamlit run app.py`, Debian's Chromium driven by Playwright."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FULLRES

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SAMPLE = FULLRES / "NORMAL2-IM-1438-0001.jpeg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not become healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def app_url(tiny_registry, tmp_path):
    """A real `streamlit run app.py` on a free port, serving the tiny registry; always terminated."""
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry), "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.headless", "true", "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        wait_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_upload_heatmap_and_threshold_in_chromium(app_url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    from PIL import Image

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator('input[type="file"]').set_input_files(str(SAMPLE))

            main = page.locator('[data-testid="stMain"]')
            probability = main.locator('[data-testid="stMetricValue"]').first
            probability.wait_for(timeout=60_000)
            assert 0.0 <= float(probability.inner_text()) <= 1.0
            heatmap = main.locator('[data-testid="stImage"] img').first
            heatmap.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
            natural = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            width, height = Image.open(SAMPLE).size
            # the overlay keeps the radiograph's aspect ratio (not the squashed model input)
            assert abs(natural[0] / natural[1] - width / height) < 0.01

            slider = page.locator('[data-testid="stSidebar"]').get_by_role("slider").first
            decision = main.locator(".st-key-diagnose_decision")
            slider.focus()
            slider.press("Home")  # threshold 0: every image is called PNEUMONIA
            expect(decision).to_contain_text("PNEUMONIA", timeout=30_000)
            assert float(slider.input_value()) == 0.0
            slider.press("End")  # threshold 1: nothing reaches it
            expect(decision).to_contain_text("NORMAL", timeout=30_000)
            assert float(slider.input_value()) == 1.0
            expect(decision).to_contain_text("at threshold 1.000")
            page.set_viewport_size({"width": 1440, "height": 1700})  # the page scrolls inside stMain
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=30_000)
            shot = tmp_path / "diagnose.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("XRAY_SCREENSHOT_DIR"):  # for a person to look at the layout
                shutil.copy(shot, Path(os.environ["XRAY_SCREENSHOT_DIR"]) / shot.name)
        finally:
            browser.close()
