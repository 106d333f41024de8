"""The Retrain page in a real browser: `streamlit run app.py`, Debian's Chromium driven by Playwright,
a tiny real training started from the form, watched to the end, and its version on the Models page."""
from __future__ import annotations

import os
import re

import pytest

from browser import new_page, require_browser, streamlit_app
from conftest import DATASET, FIXTURES
from xray.govern.identity import operator
from xray.train import jobs

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # real Chromium and a Streamlit server

TRAINING_TIMEOUT_MS = 240_000  # a tiny run takes seconds; two shared cores can make it slow


@pytest.fixture
def app_url(tiny_registry, tmp_path):
    """`streamlit run app.py` on a free port over the tiny registry; any job it started is cancelled after."""
    require_browser()
    env = {"XRAY_WEIGHTS": str(tiny_registry), "XRAY_DATA_ROOTS": os.pathsep.join([str(tmp_path), str(FIXTURES)])}
    with streamlit_app(tmp_path / "streamlit.log", env) as url:
        try:
            yield url
        finally:
            # training outlives the server by design; not past the test
            if jobs.cancel_job(tiny_registry, actor=operator()):
                job = jobs.current_job(tiny_registry)
                jobs.wait_for_job(tiny_registry, job.id, 60)


def test_retrain_from_the_page_and_see_the_new_version(app_url, tiny_registry):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(app_url, wait_until="domcontentloaded")  # the app's own navigation, as a user would
            page.get_by_role("link", name="Retrain").click()
            expect(page.get_by_text("No training has been run on this model registry yet.")).to_be_visible(timeout=120_000)

            folder = page.get_by_role("textbox", name="Dataset folder")
            folder.fill(str(DATASET))
            folder.press("Enter")
            expect(page.get_by_text("Ready to train: 16 readable images from 14 patients")).to_be_visible(timeout=120_000)

            settings = (("Epochs", "2"), ("Image size (pixels)", "64"), ("Batch size", "8"),
                        ("Validation fraction", "0.30"))
            page.get_by_text("Advanced", exact=True).click()
            for _ in range(5):  # a rerun of the page while typing (the folder scan settling) resets the form
                for label, value in settings:
                    page.get_by_role("spinbutton", name=label, exact=True).fill(value)
                page.get_by_role("textbox", name="Model widths").fill("8,16,32,64")
                page.wait_for_timeout(500)
                if all(page.get_by_role("spinbutton", name=label, exact=True).input_value() == value
                       for label, value in settings) and \
                        page.get_by_role("textbox", name="Model widths").input_value() == "8,16,32,64":
                    break
            page.get_by_role("button", name=re.compile("Start training")).click()

            done = page.get_by_text(re.compile(r"Training finished: new version"))
            expect(done).to_be_visible(timeout=TRAINING_TIMEOUT_MS)
            job = jobs.current_job(tiny_registry)
            assert job.state == jobs.SUCCEEDED and job.config.epochs == 2 and job.config.image_size == 64
            expect(page.get_by_text(job.version).first).to_be_visible()

            page.get_by_role("link", name="Models").click()
            expect(page.get_by_role("button", name=f"Activate {job.version}")).to_be_visible(timeout=120_000)
        finally:
            browser.close()
