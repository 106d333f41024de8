"""The Worklist page (AppTest): the node's films from a real spool and queue, scored by the node's own
scorer (``xray.node.worker.score``), newest first or by urgency, refusals with their reasons, and a row
opening the Diagnose page's detail view at the threshold the film was scored at."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import DATASET
from test_node import make_film, sr_finding
from xray.model.registry import Registry
from xray.node import worker
from xray.node.spool import Received, Spool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def spool(tiny_registry, tmp_path, monkeypatch) -> Spool:
    """A node's spool holding a child's film, an adult's (withheld) and an unreadable one, scored; one refusal."""
    root = tmp_path / "node"
    monkeypatch.setenv("XRAY_NODE_SPOOL", str(root))
    registry = Registry(tiny_registry)
    registry.update_card(registry.active_version(), {"borderline": {"below": 0.5, "above": 0.5}})
    spool = Spool(root)
    films = [("child", sorted((DATASET / "PNEUMONIA").glob("*.jpeg"))[0], "003Y", "Doe^Jane", "A-1"),
             ("adult", sorted((DATASET / "NORMAL").glob("*.jpeg"))[0], "045Y", "Roe^Richard", "A-2"),
             ("broken", sorted((DATASET / "NORMAL").glob("*.jpeg"))[1], "004Y", "Poe^Anna", "A-3")]
    for stem, jpeg, age, name, accession in films:
        path = tmp_path / f"{stem}.dcm"
        # "broken": it parses, but half its pixel data are missing, so it cannot be decoded
        ds = make_film(path, jpeg, age=age, name=name, accession=accession, truncate=stem == "broken")
        data = path.read_bytes()
        spool.inbox.mkdir(parents=True, exist_ok=True)
        spool.inbox_path(ds.SOPInstanceUID).write_bytes(data)
        spool.add(Received(ds.SOPInstanceUID, "ORTHANC", ds.SOPClassUID, "1.2.840.10008.1.2.1", ds.StudyInstanceUID,
                           name, f"ID-{stem}", accession, "20261201"), len(data), hashlib.sha256(data).hexdigest())
    worker.score(registry.load(), spool, spool.to_score(10))
    spool.refuse("STRANGER", "", "unknown calling AE title 'STRANGER' (allowed: ORTHANC); association rejected")
    return spool


def worklist_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/worklist.py").run()
    assert not at.exception, at.exception
    return at


def test_the_worklist_lists_the_nodes_films_by_urgency_with_reasons_and_delivery(spool):
    films = {f["patient_name"]: f for f in spool.films()}
    at = worklist_page()
    assert at.title[0].value == "Worklist"
    table = at.dataframe[0].value
    assert list(table["Patient"]) == ["Poe^Anna", "Roe^Richard", "Doe^Jane"]  # newest first
    at.radio(key="worklist_order").set_value("by urgency").run()
    table = at.dataframe[0].value
    assert list(table["Patient"]) == ["Doe^Jane", "Roe^Richard", "Poe^Anna"]  # verdict, withheld, unreadable
    rows = {r["Patient"]: r for _, r in table.iterrows()}
    child = films["Doe^Jane"]
    assert rows["Doe^Jane"]["Decision"] == child["label"] == child["csv_row"][2]  # what the node sent
    assert rows["Doe^Jane"]["Accession"] == "A-1" and rows["Doe^Jane"]["Patient ID"] == "ID-child"
    assert rows["Roe^Richard"]["Decision"] == "outside intended use" and "45 years old" in rows["Roe^Richard"]["Reason"]
    # in Diagnose's words: the header codes and measurements in brackets stay in the film's detail view
    assert "(" in films["Roe^Richard"]["error"] and "(" not in rows["Roe^Richard"]["Reason"]
    assert rows["Roe^Richard"]["p(pneumonia)"] is None or rows["Roe^Richard"]["p(pneumonia)"] != rows["Roe^Richard"]["p(pneumonia)"]
    assert rows["Poe^Anna"]["Decision"] == "unreadable" and rows["Poe^Anna"]["Reason"]
    assert all(r.startswith("waiting for delivery") for r in table["Results"])
    refusals = next(d.value for d in at.dataframe if "Calling AE" in d.value.columns)
    assert "unknown calling AE title 'STRANGER'" in refusals["Reason"][0]

    # a delivery that fails shows as undelivered, with why
    spool.delivery_failed(child["sop_uid"], "destination PACS@127.0.0.1:1 unreachable: no answer", 60)
    at.run()
    rows = {r["Patient"]: r for _, r in at.dataframe[0].value.iterrows()}
    assert rows["Doe^Jane"]["Results"].startswith("NOT DELIVERED after 1 tries: destination PACS@127.0.0.1:1")

    # a row opens the Diagnose page's detail view, at the threshold the node scored at
    at.session_state["worklist_pick"] = child["sop_uid"]
    at.run()
    assert not at.exception, at.exception
    decision = [m.value for m in at.markdown if "-background[" in m.value]
    assert len(decision) == 1 and child["label"] in decision[0]
    assert any(f"Decision at threshold {child['threshold']:.6f}" in c.value for c in at.caption)
    assert "Download DICOM results" in [b.label for b in at.download_button]
    at.session_state["worklist_pick"] = films["Poe^Anna"]["sop_uid"]
    at.run()
    assert any("Not assessed" in e.value for e in at.error)


def test_the_nodes_results_validate_and_say_why_a_film_was_not_assessed(spool):
    import shutil
    import subprocess

    import pydicom

    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dicom3tools (dciodvfy) is not installed")
    films = {f["patient_name"]: f for f in spool.films()}
    assert [len(films[name]["results"]) for name in ("Doe^Jane", "Roe^Richard", "Poe^Anna")] == [2, 1, 1]
    for path in sorted(spool.outbox.glob("*.dcm")):
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)
    broken = pydicom.dcmread(spool.outbox / films["Poe^Anna"]["results"][0])
    assert broken.SOPInstanceUID == films["Poe^Anna"]["sr_uid"] and broken.PatientName == "Poe^Anna"
    assert sr_finding(broken)[1] == f"Pneumonia not assessed (unreadable): {films['Poe^Anna']['error']}"
    assert "truncated" in films["Poe^Anna"]["error"]  # the loader's reason, as the CSV's error column says
    adult = pydicom.dcmread(spool.outbox / films["Roe^Richard"]["results"][0])
    finding, comment = sr_finding(adult)
    assert finding is None and comment.startswith(
        "Pneumonia not assessed (no verdict, outside intended use): the patient is 45 years old")


@pytest.mark.browser
@pytest.mark.slow
def test_a_click_on_a_row_opens_the_film_and_new_films_appear_by_themselves_in_chromium(spool, tmp_path):
    """`streamlit run app.py` and Debian's Chromium: the live table (a fragment refreshing every few
    seconds) shows a film the node queues after the page opened, and a click opens a row's detail view."""
    from browser import new_page, require_browser, streamlit_app

    require_browser()
    sync_api = pytest.importorskip("playwright.sync_api")
    with streamlit_app(tmp_path / "streamlit.log", {}) as url, sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(url + "/worklist", wait_until="domcontentloaded")
            page.get_by_text("3 film(s) received").wait_for()
            film = tmp_path / "late.dcm"  # the node receives another film while the page is open
            ds = make_film(film, sorted((DATASET / "PNEUMONIA").glob("*.jpeg"))[1], name="Late^Lou")
            data = film.read_bytes()
            spool.inbox_path(ds.SOPInstanceUID).write_bytes(data)
            spool.add(Received(ds.SOPInstanceUID, "ORTHANC", ds.SOPClassUID, "1.2.840.10008.1.2.1",
                               ds.StudyInstanceUID, "Late^Lou", "ID-late", "A-4", "20261201"), len(data),
                      hashlib.sha256(data).hexdigest())
            page.get_by_text("4 film(s) received").wait_for()  # no click, no reload: the fragment refreshed
            grid = page.locator('[data-testid="stDataFrame"]').first
            detail = page.get_by_text("Decision at threshold")
            # A click that lands while the live table redraws (every few seconds) is lost, as a person's would be;
            # like a person, click again. Three clicks, 60 s each: a row that never opens still fails.
            for attempt in range(3):
                box = grid.bounding_box()
                page.mouse.click(box["x"] + 12, box["y"] + 35 + 35 * 3 + 17)  # the 4th row's selection cell: Doe^Jane
                try:
                    detail.wait_for(timeout=60_000)
                    break
                except sync_api.TimeoutError:
                    if attempt == 2:
                        raise
            assert page.locator("h3").filter(has_text="Doe^Jane").count() == 1
        finally:
            browser.close()
