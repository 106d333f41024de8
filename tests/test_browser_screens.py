"""What the Diagnose screen says in a real browser (issue 26): a file over the upload limit is named with what
to do, a threshold typed outside 0-1 is refused with the value in force, and the worklist shows every row."""
from __future__ import annotations

import pytest

from browser import new_page, require_browser, streamlit_app
from conftest import DATASET

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # real Chromium and a Streamlit server


@pytest.fixture
def app_url(tiny_registry, tmp_path):
    require_browser()
    env = {"XRAY_WEIGHTS": str(tiny_registry), "XRAY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    with streamlit_app(tmp_path / "streamlit.log", env) as url:
        yield url


def test_over_limit_file_bad_threshold_and_a_whole_worklist_in_chromium(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    big = tmp_path / "huge-film.dcm"
    with open(big, "wb") as f:  # 65 MB: over the page's 64 MB, under the server's transport limit
        f.truncate(65 * 2**20)
    films = sorted((DATASET / "NORMAL").glob("*.jp*g"))[:4] + sorted((DATASET / "PNEUMONIA").glob("*.jp*g"))[:4]
    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(app_url, wait_until="domcontentloaded")
            main = page.locator('[data-testid="stMain"]')
            page.locator('input[type="file"]').set_input_files(str(big))
            expect(main.get_by_text("over the 64 MB limit")).to_be_visible(timeout=120_000)
            expect(main.get_by_text("python -m xray predict")).to_be_visible()

            sidebar = page.locator('[data-testid="stSidebar"]')
            box = sidebar.get_by_role("spinbutton", name="Exact threshold")
            in_force = box.input_value()
            box.fill("1.5")
            box.press("Enter")
            expect(sidebar.get_by_text("must be between 0 and 1")).to_be_visible(timeout=120_000)
            expect(sidebar.get_by_text(f"In force: {in_force}")).to_be_visible()
            expect(box).to_have_value(in_force)

            page.locator('input[type="file"]').set_input_files([str(f) for f in films])
            table = main.locator('[data-testid="stDataFrame"]').first
            table.wait_for(timeout=120_000)
            expect(main.get_by_text("Click a row to review")).to_be_visible(timeout=120_000)
            # the grid is tall enough for the header and all 8 rows of 56 px: nothing scrolls inside it
            assert table.bounding_box()["height"] >= 9 * 56
        finally:
            browser.close()
