"""The Diagnose page in a real browser: `streamlit run app.py`, Debian's Chromium driven by Playwright."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from browser import new_page, require_browser, streamlit_app
from conftest import FULLRES

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # real Chromium and a Streamlit server

SAMPLE = FULLRES / "NORMAL2-IM-1438-0001.jpeg"


def settled(page) -> None:
    """Wait until Streamlit reports no script run in progress."""
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)


@pytest.fixture
def app_url(tiny_registry, tmp_path):
    """A real `streamlit run app.py` on a free port, serving the tiny registry; always terminated."""
    require_browser()
    env = {"XRAY_WEIGHTS": str(tiny_registry), "XRAY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    with streamlit_app(tmp_path / "streamlit.log", env) as url:
        yield url


def last_audit_line(tmp_path) -> dict:
    import json

    return json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])


def test_upload_heatmap_and_threshold_in_chromium(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    from PIL import Image

    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator('input[type="file"]').set_input_files(str(SAMPLE))

            main = page.locator('[data-testid="stMain"]')
            probability = main.locator('[data-testid="stMetricValue"]').first
            probability.wait_for(timeout=120_000)
            assert 0.0 <= float(probability.inner_text()) <= 1.0
            heatmap = main.locator('[data-testid="stImage"] img').first
            heatmap.wait_for(timeout=120_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
            natural = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            width, height = Image.open(SAMPLE).size
            # the overlay keeps the radiograph's aspect ratio (not the squashed model input)
            assert abs(natural[0] / natural[1] - width / height) < 0.01

            slider = page.locator('[data-testid="stSidebar"]').get_by_role("slider").first
            decision = main.locator(".st-key-result_decision")
            slider.focus()
            slider.press("Home")  # threshold 0: every image is called PNEUMONIA
            expect(decision).to_contain_text("at threshold 0.000", timeout=120_000)
            expect(decision).to_contain_text("PNEUMONIA")
            settled(page)  # the rerun has finished: the next key press is not raced by it
            assert float(slider.input_value()) == 0.0
            # what the screen shows is what the audit log records
            assert (last_audit_line(tmp_path)["threshold"], last_audit_line(tmp_path)["decision"]) == (0.0, "PNEUMONIA")
            slider.press("End")  # threshold 1: nothing reaches it
            expect(decision).to_contain_text("at threshold 1.000", timeout=120_000)
            expect(decision).to_contain_text("NORMAL")
            settled(page)
            assert float(slider.input_value()) == 1.0
            assert (last_audit_line(tmp_path)["threshold"], last_audit_line(tmp_path)["decision"]) == (1.0, "NORMAL")
            page.set_viewport_size({"width": 1440, "height": 1700})  # the page scrolls inside stMain
            settled(page)
            shot = tmp_path / "diagnose.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("XRAY_SCREENSHOT_DIR"):  # for a person to look at the layout
                shutil.copy(shot, Path(os.environ["XRAY_SCREENSHOT_DIR"]) / shot.name)
        finally:
            browser.close()


# Records, from the first paint on, every page link the sidebar ever shows and when the uploader and the
# threshold slider first appear (a fresh server's first run is the one Streamlit runs in its legacy pages/ mode).
WATCH_FIRST_SCREEN = """
window.__links = new Set(); window.__firstUploader = null; window.__firstSlider = null;
new MutationObserver(() => {
  document.querySelectorAll('[data-testid="stSidebar"] a, [data-testid="stSidebarNavLink"]').forEach(a => {
    const lines = a.innerText.split("\\n").map(t => t.trim()).filter(Boolean);
    if (lines.length) window.__links.add(lines[lines.length - 1]);
  });
  if (window.__firstUploader === null && document.querySelector('[data-testid="stFileUploaderDropzone"]'))
    window.__firstUploader = performance.now();
  if (window.__firstSlider === null && document.querySelector('[data-testid="stSidebar"] [data-testid="stSlider"]'))
    window.__firstSlider = performance.now();
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def test_a_fresh_server_lists_only_the_pages_and_offers_the_uploader_first(app_url):
    """Issue 26, first use: on a fresh server the sidebar never lists the files of pages/ ("app", "common", as
    Streamlit's legacy mode would), only the app's pages; the uploader appears no later than the threshold's
    widgets (it is sent before the model loads) and works: a film dropped at once gets its probability. Nothing
    is fetched from anywhere but this server (the tab's icon included)."""
    from urllib.parse import urlparse

    sync_api = pytest.importorskip("playwright.sync_api")
    elsewhere = []
    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.on("request", lambda request: elsewhere.append(request.url)
                    if urlparse(request.url).hostname not in (None, "", "localhost", "127.0.0.1") else None)
            page.add_init_script(WATCH_FIRST_SCREEN)
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator('[data-testid="stFileUploaderDropzone"]').wait_for(state="visible")
            page.locator('input[type="file"]').set_input_files(str(SAMPLE))  # at once, the model may still load
            probability = page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]').first
            probability.wait_for(timeout=120_000)
            assert 0.0 <= float(probability.inner_text()) <= 1.0
            settled(page)
            links = set(page.evaluate("[...window.__links]"))
            first_uploader, first_slider = page.evaluate("[window.__firstUploader, window.__firstSlider]")
        finally:
            browser.close()
    assert links == {"Diagnose", "Worklist", "Retrain", "Models", "About"}, links
    assert first_uploader is not None and first_slider is not None
    assert first_uploader <= first_slider
    assert not elsewhere, elsewhere


def test_a_bookmark_to_a_page_opens_that_page_on_a_fresh_server(app_url):
    """The first visit to /about on a new server runs in Streamlit's legacy pages/ mode; the app sends it
    through app.py and on to the page asked for (pages/common.py ensure_app_navigation)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(app_url + "/about", wait_until="domcontentloaded")
            page.get_by_role("heading", name="About this model").wait_for(timeout=120_000)
            assert "Diagnose" not in page.locator('[data-testid="stMain"] h1').first.inner_text()
        finally:
            browser.close()


def test_report_download_in_chromium_is_the_pdf_of_what_the_screen_shows(app_url, tmp_path):
    import json

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator('input[type="file"]').set_input_files(str(SAMPLE))
            button = page.get_by_role("button", name="Download report (PDF)")
            button.wait_for(timeout=120_000)
            settled(page)
            with page.expect_download(timeout=120_000) as download:
                button.click()
            path = tmp_path / "report.pdf"
            download.value.save_as(path)
        finally:
            browser.close()
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 20_000
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    shown = [e for e in lines if e.get("shown_in") == "screen"]
    reported = [e for e in lines if e.get("shown_in") == "report"]
    # the download is logged as what it reports: the file, threshold and decision the screen showed
    assert shown and reported
    keys = ("sha256", "model_version", "threshold", "decision", "outcome")
    assert [reported[-1][k] for k in keys] == [shown[-1][k] for k in keys]
