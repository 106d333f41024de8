"""The Retrain page in a real browser: `streamlit run app.py`, Debian's Chromium driven by Playwright,
a tiny real training started from the form, watched to the end, and its version on the Models page."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DATASET, FIXTURES
from xray import jobs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TRAINING_TIMEOUT_MS = 150_000  # a tiny run takes seconds; two shared cores can make it slow


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
    """`streamlit run app.py` on a free port over the tiny registry; any job it started is cancelled after."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium")
    pytest.importorskip("playwright.sync_api")
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry), "PYTHONPATH": str(ROOT),
           "XRAY_DATA_ROOTS": os.pathsep.join([str(tmp_path), str(FIXTURES)])}
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
        if jobs.cancel_job(tiny_registry):  # training outlives the server by design; not past the test
            job = jobs.current_job(tiny_registry)
            jobs.wait_for_job(tiny_registry, job.id, 60)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_retrain_from_the_page_and_see_the_new_version(app_url, tiny_registry):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")  # the app's own navigation, as a user would
            page.get_by_role("link", name="Retrain").click()
            expect(page.get_by_text("No training has been run on this model registry yet.")).to_be_visible(timeout=60_000)

            folder = page.get_by_role("textbox", name="Dataset folder")
            folder.fill(str(DATASET))
            folder.press("Enter")
            expect(page.get_by_text("Ready to train: 16 readable images from 14 patients")).to_be_visible(timeout=60_000)

            for label, value in (("Epochs", "2"), ("Image size (pixels)", "64"), ("Batch size", "8"),
                                 ("Validation fraction", "0.30")):
                page.get_by_role("spinbutton", name=label, exact=True).fill(value)
            page.get_by_text("Advanced", exact=True).click()
            page.get_by_role("textbox", name="Model widths").fill("8,16,32,64")
            page.get_by_role("button", name=re.compile("Start training")).click()

            done = page.get_by_text(re.compile(r"Training finished: new version"))
            expect(done).to_be_visible(timeout=TRAINING_TIMEOUT_MS)
            job = jobs.current_job(tiny_registry)
            assert job.state == jobs.SUCCEEDED and job.config.epochs == 2 and job.config.image_size == 64
            expect(page.get_by_text(job.version).first).to_be_visible()

            page.get_by_role("link", name="Models").click()
            expect(page.get_by_role("button", name=f"Activate {job.version}")).to_be_visible(timeout=60_000)
        finally:
            browser.close()
