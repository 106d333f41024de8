"""The Diagnose page through Streamlit's AppTest (uploads, samples, threshold, presets, saving the
default), and the engine behind it, xray.serve.analysis."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASET, FULLRES, GENERATED
from xray.serve import analysis
from xray.serve.pipeline import CSV_HEADER
from xray.io.loader import load_image
from xray.serve.inference import Prediction, predict
from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
NORMAL_FULLRES = FULLRES / "NORMAL2-IM-1438-0001.jpeg"
PNEUMONIA_FULLRES = FULLRES / "person1951_bacteria_4882.jpeg"
PNEUMONIA_SMALL = DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
INCOMPLETE_JPEG = "the JPEG file is incomplete (truncated: the transfer or copy was cut off): send or export it again"


def upload(path: Path, name: str | None = None, mime: str = "image/jpeg") -> tuple[str, bytes, str]:
    return (name or path.name, path.read_bytes(), mime)


def start_app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def drop(at, *files):
    at.file_uploader(key="diagnose_uploads").set_value(list(files)).run()
    assert not at.exception, at.exception
    return at


def metric(at, label: str) -> str:
    """A metric's value by its label, or by the start of it (PPV and NPV name their prevalence)."""
    return next(m.value for m in at.metric if m.label == label or m.label.startswith(label.split(" (")[0] + " at"))


def decision(at) -> str:
    texts = [m.value for m in at.markdown if "-background[" in m.value]
    assert len(texts) == 1, texts
    return "PNEUMONIA" if "PNEUMONIA" in texts[0] else "NORMAL"


def validation_of(registry: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    registry = Registry(registry)
    card = registry.card(registry.active_version())
    stored = card["validation"]["predictions"]
    return np.array(stored["label"]), np.array(stored["p_pneumonia"]), card


# -- the engine ------------------------------------------------------------------------------------
def test_analyse_scores_bytes_exactly_like_predict(tiny_model):
    data = NORMAL_FULLRES.read_bytes()
    result = analysis.analyse(tiny_model, data, NORMAL_FULLRES.name)
    expected = predict(tiny_model, [load_image(NORMAL_FULLRES)])[0]
    assert result.error == "" and result.ok
    assert result.prediction.p_pneumonia == pytest.approx(expected.p_pneumonia, abs=1e-9)
    assert result.prediction.model_version == tiny_model.version
    assert result.image.size == load_image(NORMAL_FULLRES).size
    import hashlib
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_analyse_reports_unreadable_files_in_one_line(tiny_model):
    result = analysis.analyse(tiny_model, (GENERATED / "truncated.jpeg").read_bytes(), "truncated.jpeg")
    assert not result.ok and result.image is None
    assert result.error == INCOMPLETE_JPEG and result.incomplete
    assert analysis.analyse(tiny_model, b"", "empty.png").error == "empty file (0 bytes)"


def test_heatmap_is_aligned_with_the_displayed_image(tiny_model):
    image = load_image(PNEUMONIA_FULLRES)  # 1016 x 656: taller than wide
    pixels = analysis.display_pixels(image)
    cam = analysis.display_colour_levels(tiny_model, image)
    assert cam.shape == pixels.shape and max(cam.shape) <= analysis.DISPLAY_SIDE
    assert abs(pixels.shape[1] / pixels.shape[0] - image.size[0] / image.size[1]) < 0.01
    assert cam.dtype == np.float32 and 0.0 <= cam.min() <= cam.max() <= 1.0
    png = analysis.overlay_png(pixels, cam, 0.4)
    from PIL import Image
    assert Image.open(io.BytesIO(png)).size == (pixels.shape[1], pixels.shape[0])


def test_worklist_csv_has_cli_columns_sorted_by_probability(tiny_model):
    files = [NORMAL_FULLRES, PNEUMONIA_FULLRES, PNEUMONIA_SMALL, GENERATED / "truncated.jpeg"]
    analyses = [analysis.analyse(tiny_model, f.read_bytes(), f.name) for f in files]
    rows = list(csv.reader(io.StringIO(analysis.worklist_csv(analyses, 0.5))))
    assert rows[0] == CSV_HEADER and len(rows) == 5
    verdicts = [r for r in rows[1:] if r[2]]
    assert verdicts and rows[1:1 + len(verdicts)] == verdicts  # every verdict above the rest
    assert [float(r[1]) for r in verdicts] == sorted((float(r[1]) for r in verdicts), reverse=True)
    assert all(r[2] == ("PNEUMONIA" if float(r[1]) >= 0.5 else "NORMAL") and r[3] == "0.500000" for r in verdicts)
    flagged = {a.name for a in analyses if a.ok and getattr(a.prediction, "ood", False)}
    for row in rows[1:]:
        if row[0] in flagged:  # out of distribution: score kept, no verdict, reason as the CLI writes it
            assert row[1] and row[2] == "" and row[4].startswith(("not a chest radiograph: ", "outside intended use: "))
    assert rows[-1] == ["truncated.jpeg", "", "", "0.500000", INCOMPLETE_JPEG, "", ""]


# -- the page --------------------------------------------------------------------------------------
def test_upload_shows_probability_decision_version_and_heatmap(tiny_registry):
    at = drop(start_app(), upload(NORMAL_FULLRES))
    model = Registry(tiny_registry).load()
    p = predict(model, [load_image(NORMAL_FULLRES)])[0].p_pneumonia
    assert metric(at, "p(pneumonia)") == f"{p:.3f}"
    assert decision(at) == ("PNEUMONIA" if p >= model.threshold else "NORMAL")
    assert any(f"Model version {model.version}" in c.value for c in at.caption)
    assert len(at.image) == 2  # the overlay, on by default, and the colour legend
    assert any(c.value.startswith("Same colour scale on every film") for c in at.caption)
    assert at.toggle(key="result_heatmap_on").value is True
    assert sorted(b.label for b in at.download_button) == ["Download overlay (PNG)", "Download report (PDF)"]


def test_dicom_header_fields_and_the_patient_are_shown_before_the_result(tiny_registry):
    import pydicom

    at = drop(start_app(), upload(GENERATED / "chest.dcm", mime="application/dicom"))
    ds = pydicom.dcmread(GENERATED / "chest.dcm", stop_before_pixels=True)
    texts = [m.value for m in at.main.markdown]
    patient = next(i for i, t in enumerate(texts) if t.startswith("**Patient:**"))
    assert patient == 0  # who it is comes before anything the model says
    for label, key in (("Patient", "PatientName"), ("Patient ID", "PatientID"), ("Birth date", "PatientBirthDate"),
                       ("Study date", "StudyDate"), ("Accession number", "AccessionNumber")):
        value = str(ds.get(key, "") or "") or "not recorded"
        assert f"**{label}:** {analysis_name_escaped(value)}" in texts[patient]
    fields = [d.value for d in at.dataframe if list(d.value.columns) == ["Field", "Value"]]
    assert fields, "no DICOM header table"
    shown = dict(zip(fields[0]["Field"], fields[0]["Value"]))
    assert shown["Modality"] == "CR" and shown["View position"] == "AP"
    assert shown["Patient age"] == "003Y" and shown["Patient sex"] == "F"


def test_broken_file_gets_its_message_and_the_others_their_results(tiny_registry):
    at = drop(start_app(), upload(GENERATED / "truncated.jpeg", name="broken *scan*.jpeg"), upload(NORMAL_FULLRES))
    assert len(at.error) == 1
    # the file name reaches markdown escaped: no bold, no link, text as typed
    assert at.error[0].value == (r"**broken \*scan\*\.jpeg** arrived incomplete: the JPEG file is incomplete "
                                 r"\(truncated\: the transfer or copy was cut off\)\: send or export it again")
    table = next(d.value for d in at.dataframe if "Decision" in d.value.columns)
    assert list(table["File"]) == [NORMAL_FULLRES.name, "broken *scan*.jpeg"]
    assert list(table["Decision"])[1] == "Unreadable"
    assert metric(at, "p(pneumonia)")  # the readable image still has its result


def test_threshold_slider_moves_decisions_and_validation_metrics(tiny_registry):
    labels, scores, card = validation_of(tiny_registry)
    at = drop(start_app(), upload(NORMAL_FULLRES), upload(PNEUMONIA_SMALL))
    slider = at.slider(key="diagnose_threshold")
    assert slider.value == pytest.approx(card["threshold"])

    slider.set_value(0.0).run()
    table = next(d.value for d in at.dataframe if "Decision" in d.value.columns)
    assert list(table["Decision"]) == ["PNEUMONIA", "PNEUMONIA"] and decision(at) == "PNEUMONIA"
    assert metric(at, "Sensitivity") == "1.000" and metric(at, "Specificity") == "0.000"
    assert metric(at, "PPV") == f"{labels.mean():.3f}"  # everything called positive

    at.slider(key="diagnose_threshold").set_value(1.0).run()
    table = next(d.value for d in at.dataframe if "Decision" in d.value.columns)
    assert list(table["Decision"]) == ["NORMAL", "NORMAL"] and decision(at) == "NORMAL"
    assert metric(at, "Sensitivity") == "0.000" and metric(at, "Specificity") == "1.000"
    assert metric(at, "PPV") == "n/a"

    middle = float(np.median(scores))
    at.slider(key="diagnose_threshold").set_value(middle).run()
    called = scores >= middle
    tp, fp = int(np.sum(called & (labels == 1))), int(np.sum(called & (labels == 0)))
    assert metric(at, "Sensitivity") == f"{tp / labels.sum():.3f}"
    assert metric(at, "PPV") == f"{tp / (tp + fp):.3f}"
    matrix = next(m.value for m in at.sidebar.markdown if "true positive" in m.value)  # under Details
    fn, tn = int(labels.sum()) - tp, int((labels == 0).sum()) - fp
    assert f"{tp} true positive, {fn} false negative, {fp} false positive, {tn} true negative" in matrix
    assert any(f"Missed: {fn} of {tp + fn} pneumonia films; false alarms: {fp} of {fp + tn}" in c.value
               for c in at.sidebar.caption)


def test_presets_are_distinct_operating_points_and_set_the_threshold(tiny_registry):
    from pages.common import PRESET_MIN_GAP, PRESET_RULES
    from xray.decide.metrics import choose_threshold, metrics_at

    labels, scores, card = validation_of(tiny_registry)
    at = start_app()
    presets = {b.key.removeprefix("diagnose_preset_"): b for b in at.button if b.key.startswith("diagnose_preset_")}
    values = {name: float(b.label.split(": ")[1].split()[0]) for name, b in presets.items()}
    assert values["Model default"] == pytest.approx(card["threshold"], abs=1e-3)
    for name, rule in PRESET_RULES.items():
        expected = choose_threshold(labels, scores, rule)
        if name in presets:
            at.slider(key="diagnose_threshold").set_value(0.5).run()
            at.button(key=f"diagnose_preset_{name}").click().run()
            assert at.number_input(key="diagnose_threshold_exact").value == pytest.approx(expected)
            assert "sens" in presets[name].label and "spec" in presets[name].label
        else:  # left out because it is the same choice as another, or does not do what its name says
            default = metrics_at(labels, scores, card["threshold"])
            kept = "sensitivity" if "sensitivity" in rule else "specificity"
            assert (min(abs(expected - v) for v in values.values()) < PRESET_MIN_GAP
                    or metrics_at(labels, scores, expected)[kept] <= default[kept])
    ordered = sorted(values.values())
    assert all(b - a >= PRESET_MIN_GAP for a, b in zip(ordered, ordered[1:]))
    at.slider(key="diagnose_threshold").set_value(0.9).run()
    at.button(key="diagnose_preset_Model default").click().run()
    assert at.number_input(key="diagnose_threshold_exact").value == card["threshold"]  # exactly


def test_saving_a_site_threshold_needs_why_and_restore_brings_back_the_exact_card_value(tiny_registry):
    import json

    from xray.govern.identity import operator

    labels, scores, card = validation_of(tiny_registry)
    card_file = tiny_registry / "versions" / card["version"] / "card.json"
    card_bytes = card_file.read_bytes()
    at = start_app()
    at.number_input(key="diagnose_threshold_exact").set_value(0.3).run()
    assert at.button(key="diagnose_save_default").disabled  # no reason or confirmation yet
    assert "diagnose_save_by" not in {w.key for w in at.text_input}  # who saves is who is signed in
    at.text_input(key="diagnose_save_why").input("local audit of 2026").run()
    assert at.button(key="diagnose_save_default").disabled
    at.checkbox(key="diagnose_save_confirm").check().run()
    at.button(key="diagnose_save_default").click().run()
    assert not at.exception, at.exception
    assert card_file.read_bytes() == card_bytes  # the model's card is untouched
    site = json.loads((tiny_registry / "site.json").read_text())["thresholds"][card["version"]]
    assert site["threshold"] == 0.3 and site["by"] == operator().label and site["why"] == "local audit of 2026"
    assert any("Saved 0.300000" in s.value for s in at.success)
    fresh = start_app()  # a new session starts at the site's threshold
    assert fresh.number_input(key="diagnose_threshold_exact").value == 0.3
    assert any(operator().label in c.value and "local audit of 2026" in c.value for c in fresh.sidebar.caption)
    fresh.button(key="diagnose_restore_threshold").click().run()
    assert fresh.number_input(key="diagnose_threshold_exact").value == card["threshold"]  # exactly, not 0.734
    assert start_app().number_input(key="diagnose_threshold_exact").value == card["threshold"]
    assert fresh.button(key="diagnose_restore_threshold").disabled


def test_opacity_and_threshold_never_rerun_the_model(tiny_registry, monkeypatch):
    calls = {"analyse": 0, "heatmap": 0}
    real_analyse, real_heatmap = analysis.analyse, analysis.display_colour_levels

    def counting_analyse(*args, **kwargs):
        calls["analyse"] += 1
        return real_analyse(*args, **kwargs)

    def counting_heatmap(*args, **kwargs):
        calls["heatmap"] += 1
        return real_heatmap(*args, **kwargs)

    opacities = []
    real_overlay = analysis.overlay_jpeg

    def recording_overlay(pixels, cam, alpha):
        opacities.append(alpha)
        return real_overlay(pixels, cam, alpha)

    monkeypatch.setattr(analysis, "analyse", counting_analyse)
    monkeypatch.setattr(analysis, "display_colour_levels", counting_heatmap)
    monkeypatch.setattr(analysis, "overlay_jpeg", recording_overlay)
    at = drop(start_app(), upload(NORMAL_FULLRES))
    assert calls == {"analyse": 1, "heatmap": 1}
    at.slider(key="result_opacity").set_value(0.9).run()
    assert opacities[-1] == 0.9  # a new overlay was drawn...
    at.toggle(key="result_side_by_side").set_value(True).run()
    assert len(at.image) == 3  # film, overlay, legend
    at.slider(key="diagnose_threshold").set_value(0.0).run()
    assert calls == {"analyse": 1, "heatmap": 1}  # ...from the cached map and score


def test_try_a_sample_in_one_click(tiny_registry):
    at = start_app()
    assert at.info and "try a bundled sample" in at.info[0].value
    first_sample = at.selectbox(key="diagnose_sample_choice").value
    at.button(key="diagnose_try_sample").click().run()
    assert not at.exception, at.exception
    assert at.main.subheader[-1].value == analysis_name_escaped(first_sample.name)
    assert metric(at, "p(pneumonia)") and decision(at) in ("PNEUMONIA", "NORMAL")
    at.button(key="diagnose_clear_samples").click().run()
    assert not [m for m in at.metric if m.label == "p(pneumonia)"]


def analysis_name_escaped(name: str) -> str:
    from pages.common import escape_markdown
    return escape_markdown(name)


@dataclass(frozen=True)
class FlaggedPrediction(Prediction):
    """The shape the safety check (issue 5) will give a prediction it flags."""

    outcome: str = "outside intended use"
    withheld_reason: str = "looks like a photograph (distance 74.0; limit 41.8)"


def test_out_of_distribution_images_get_no_verdict(tiny_registry, monkeypatch):
    real_analyse = analysis.analyse

    def flagging_analyse(*args, **kwargs):
        result = real_analyse(*args, **kwargs)
        p = result.prediction
        result.prediction = FlaggedPrediction(p.p_pneumonia, p.model_version)
        return result

    monkeypatch.setattr(analysis, "analyse", flagging_analyse)
    at = drop(start_app(), upload(NORMAL_FULLRES))
    assert "**Outside the intended use**: looks like a photograph" in at.warning[0].value
    assert "(distance" not in at.warning[0].value  # the measurement is under Details, not in the message
    assert not [m for m in at.markdown if "-background[" in m.value]  # no PNEUMONIA / NORMAL verdict
    assert any(m.value.startswith(":gray[The model's output was") for m in at.markdown)  # under Details
    assert not at.toggle  # no heatmap controls either


def test_activation_and_damage_are_picked_up_without_restart(tiny_registry):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    at = start_app()
    model = registry.load()
    second = registry.save_version(model.net, {**model.card, "threshold": 0.42}, "second")
    registry.activate(second)
    at.run()
    assert any("Model second" in c.value for c in at.caption)
    assert at.slider(key="diagnose_threshold").value == pytest.approx(0.42)
    weights = registry.version_dir(second) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10])  # damaged on disk: the card changes nothing, so touch it
    registry.update_card(second, {"notes": "weights damaged in test"})
    at.run()
    assert any("checksum mismatch" in w.value and first in w.value for w in at.warning)
    assert any(f"Model {first}" in c.value for c in at.caption)


def test_the_uploader_comes_before_the_model_line_and_the_sidebar_lists_the_pages(tiny_registry):
    """Issue 26, first use: the page sends its uploader before it loads the model (so a fresh server shows it
    sooner); the model's line and the threshold follow. The sidebar's page list is app.py's page links."""
    at = start_app()
    main = [(n.type, str(getattr(n, "value", ""))) for n in at.main]
    uploader = next(i for i, (kind, _) in enumerate(main) if kind == "file_uploader")
    model_line = next(i for i, (kind, value) in enumerate(main) if kind == "caption" and value.startswith("Model "))
    assert [kind for kind, _ in main[1:3]] == ["title", "caption"] and uploader < model_line
    sidebar = [(n.type, str(getattr(n, "value", ""))) for n in at.sidebar]
    links = [value for kind, value in sidebar if kind == "page_link"]
    assert links == ["Diagnose", "Worklist", "Retrain", "Models", "About"]  # local mode: the administrator's pages
    assert [kind for kind, _ in sidebar].index("slider") > len(links)  # the threshold after the page list


def test_no_model_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_WEIGHTS", str(tmp_path / "empty-registry"))
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert "No model is available" in at.error[0].value
    assert not at.file_uploader


# -- what is shown is what is recorded (audit log) ---------------------------------------------------
def _audit_lines() -> list[dict]:
    import json
    import os

    path = Path(os.environ["XRAY_AUDIT_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_moving_the_threshold_logs_the_decision_on_screen_at_that_threshold(tiny_registry):
    before = len(_audit_lines())
    at = drop(start_app(), upload(NORMAL_FULLRES))
    p = float(metric(at, "p(pneumonia)"))
    shown = _audit_lines()[before:]
    assert [(e["threshold"], e["decision"]) for e in shown] == [(Registry(tiny_registry).load().threshold, decision(at))]
    for value in (0.0, 1.0):
        at.slider(key="diagnose_threshold").set_value(value).run()
        last = _audit_lines()[-1]
        assert last["threshold"] == value and last["decision"] == decision(at)
        assert last["decision"] == ("PNEUMONIA" if p >= value else "NORMAL")
    count = len(_audit_lines())
    at.run()  # a rerun shows the same result again: no new line
    assert len(_audit_lines()) == count
    at.slider(key="diagnose_threshold").set_value(0.0).run()  # shown before in this session: logged once
    assert len(_audit_lines()) == count


def test_the_exact_threshold_is_typed_and_used_unrounded(tiny_registry):
    at = drop(start_app(), upload(NORMAL_FULLRES))
    exact = at.number_input(key="diagnose_threshold_exact")
    assert exact.value == Registry(tiny_registry).load().threshold  # the card's value, not the slider's 0.001 grid
    exact.set_value(0.123457).run()
    assert _audit_lines()[-1]["threshold"] == 0.123457
    table = analysis.worklist_csv([analysis.analyse(Registry(tiny_registry).load(), NORMAL_FULLRES.read_bytes(),
                                                    NORMAL_FULLRES.name)], 0.123457)
    assert table.splitlines()[1].split(",")[3] == "0.123457"


def test_prevalence_setting_adjusts_probability_ppv_and_npv_but_not_the_decision(tiny_registry):
    import json

    from xray.decide.prevalence import adjust_to_prevalence, predictive_values

    labels, scores, card = validation_of(tiny_registry)
    at = drop(start_app(), upload(NORMAL_FULLRES))
    calibrated_at = float(labels.mean())
    assert at.number_input(key="diagnose_prevalence").value == pytest.approx(calibrated_at)
    before = decision(at)
    p = predict(Registry(tiny_registry).load(), [load_image(NORMAL_FULLRES)])[0].p_pneumonia
    at.number_input(key="diagnose_prevalence").set_value(0.2).run()
    assert decision(at) == before  # the decision is on the model's probability, whatever the prevalence
    adjusted = float(adjust_to_prevalence(p, calibrated_at, 0.2))
    assert any(f"p(pneumonia) {adjusted:.3f}" in m.value for m in at.markdown)
    from xray.decide.metrics import metrics_at

    figures = metrics_at(labels, scores, at.number_input(key="diagnose_threshold_exact").value)
    ppv, _ = predictive_values(figures["sensitivity"], figures["specificity"], 0.2)
    assert metric(at, "PPV") == ("n/a" if ppv != ppv else f"{ppv:.3f}")
    assert any("PPV and NPV at this site's prevalence, 20%" in c.value for c in at.sidebar.caption)
    at.button(key="diagnose_save_prevalence").click().run()
    assert json.loads((tiny_registry / "site.json").read_text())["prevalence"] == 0.2
    assert start_app().number_input(key="diagnose_prevalence").value == 0.2  # a new session starts from it
    assert any("Probabilities calibrated on" in c.value for c in at.caption)
    assert [e for e in _audit_lines() if e.get("event") == "prevalence-saved"][-1]["prevalence"] == 0.2


# -- issue 26: the screen says what it should ---------------------------------------------------------
def test_a_preset_is_offered_only_where_it_does_what_its_name_says(tiny_registry):
    labels, scores, card = validation_of(tiny_registry)
    registry = Registry(tiny_registry)
    # a default above every normal film is as specific as can be: no "High specificity" can beat it
    registry.update_card(card["version"], {"threshold": float(scores[labels == 0].max()) + 1e-6})
    at = start_app()
    keys = {b.key for b in at.button}
    assert "diagnose_preset_High specificity" not in keys
    # a default at 0 finds every pneumonia film: no "High sensitivity" can beat it
    registry.update_card(card["version"], {"threshold": 0.0})
    at = start_app()
    assert "diagnose_preset_High sensitivity" not in {b.key for b in at.button}


def test_a_threshold_typed_outside_0_1_is_named_and_the_one_in_force_shown(tiny_registry):
    at = drop(start_app(), upload(NORMAL_FULLRES))
    in_force = at.number_input(key="diagnose_threshold_exact").value
    for typed in (1.5, -0.2):
        at.number_input(key="diagnose_threshold_exact").set_value(typed).run()
        assert not at.exception, at.exception
        message = at.sidebar.error[0].value
        assert "must be between 0 and 1" in message and f"In force: {in_force:.6f}" in message, message
        assert at.number_input(key="diagnose_threshold_exact").value == in_force
        assert _audit_lines()[-1]["threshold"] == in_force  # nothing was decided at the typed value
    at.run()
    assert not at.sidebar.error  # said once, at the time


def test_a_file_over_the_upload_limit_is_named_with_what_to_do(tiny_registry):
    from pages.diagnose import UPLOAD_LIMIT_MB

    big = ("film.dcm", b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 1), "application/dicom")
    at = drop(start_app(), big, upload(NORMAL_FULLRES))
    message = next(e.value for e in at.error if r"film\.dcm" in e.value)
    assert f"over the {UPLOAD_LIMIT_MB} MB limit" in message and "python -m xray predict" in message
    assert metric(at, "p(pneumonia)")  # the other film still has its result
    import tomllib
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] > UPLOAD_LIMIT_MB  # the file reaches the page to be named


def test_worklist_shows_every_row_whole_reasons_and_coloured_decisions(tiny_registry, monkeypatch):
    from pages.result_view import DECISION_BACKGROUND

    real_analyse = analysis.analyse

    def flag_one(model, data, name):
        result = real_analyse(model, data, name)
        if name == "flagged.jpeg":
            p = result.prediction
            result.prediction = FlaggedPrediction(p.p_pneumonia, p.model_version)
        return result

    monkeypatch.setattr(analysis, "analyse", flag_one)
    films = sorted((DATASET / "NORMAL").glob("*.jp*g"))[:3] + sorted((DATASET / "PNEUMONIA").glob("*.jp*g"))[:3]
    files = [upload(f) for f in films] + [upload(NORMAL_FULLRES, name="flagged.jpeg"),
                                          upload(GENERATED / "truncated.jpeg"),
                                          upload(GENERATED / "chest.dcm", mime="application/dicom")]
    at = drop(start_app(), *files)
    table = next(d for d in at.dataframe if "Decision" in d.value.columns)
    assert len(table.value) == 9
    decisions = list(table.value["Decision"])
    assert decisions[-1] == "Unreadable"
    rows = table.value.set_index("File")
    assert rows.loc["flagged.jpeg", "Decision"] == "No verdict"
    assert rows.loc[["flagged.jpeg", "truncated.jpeg"], "p(pneumonia)"].isna().all()  # withheld means withheld
    assert rows.loc["chest.dcm", "Patient"] == "Test^Fixture"  # whose film it is, as the DICOM says
    styles = table.proto.arrow_data.styler.styles
    for decision_word in set(decisions) & set(DECISION_BACKGROUND):
        assert DECISION_BACKGROUND[decision_word] in styles
    reasons = [m.value for m in at.markdown if m.value.startswith("**flagged")]
    assert reasons == [r"**flagged\.jpeg** (no verdict): looks like a photograph."]
    unreadable = analysis.analyse(Registry(tiny_registry).load(), (GENERATED / "truncated.jpeg").read_bytes(),
                                  "truncated.jpeg")
    assert any(m.value == rf"**truncated\.jpeg** (unreadable): {analysis_name_escaped(unreadable.error)}."
               for m in at.markdown)  # the whole reason


def test_side_by_side_gives_each_film_half_the_page(tiny_registry):
    at = drop(start_app(), upload(NORMAL_FULLRES))
    at.toggle(key="result_side_by_side").set_value(True).run()
    assert not at.exception, at.exception
    # the two films sit in a two-column row of the main area, not inside the 3:2 image column
    with_films = [c for c in at.main.columns if any(type(e).__name__ == "Image" for e in c.children.values())]
    assert [c.proto.weight for c in with_films] == [pytest.approx(0.5), pytest.approx(0.5)]


def test_another_page_shows_one_film_with_the_same_view(tiny_registry, tmp_path):
    """pages/result_view.py result_ui is importable: a page with a film's bytes shows the same screen."""
    from streamlit.testing.v1 import AppTest

    script = tmp_path / "one_film.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from pages.result_view import report_input_for, result_ui\n"
        "from xray.model.registry import Registry\n"
        "from xray.serve import analysis\n"
        "model = Registry().load()\n"
        f"data = Path({str(GENERATED / 'chest.dcm')!r}).read_bytes()\n"
        "result_ui(model, report_input_for(analysis.analyse(model, data, 'chest.dcm'), 0.5, 0.5, data))\n")
    at = AppTest.from_file(str(script), default_timeout=120).run()
    assert not at.exception, at.exception
    assert at.markdown[0].value.startswith("**Patient:** Test^Fixture")
    assert any(b.label == "Download report (PDF)" for b in at.download_button)


def test_the_validation_curves_are_drawn_on_request_only(tiny_registry):
    """The first screen sends no chart (the browser's heaviest load); the toggle under Details draws the ROC and
    precision-recall curves of the validation films."""
    at = start_app()
    assert not at.get("plotly_chart")
    at.checkbox(key="diagnose_show_curves").check().run()
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    import json

    titles = [json.dumps(json.loads(chart.proto.spec)["layout"].get("title", "")) for chart in charts]
    assert "ROC" in titles[0] and "Precision-recall" in titles[1]
