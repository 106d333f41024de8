"""Models page (AppTest): versions side by side with the active one, ROC curves from the cards,
activate and roll back."""
from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from conftest import train_tiny
from xray.decide import metrics
from xray.model.registry import Registry

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "models.py")


def open_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception
    return at


def test_versions_compared_activated_and_rolled_back(tiny_registry):
    registry = Registry(tiny_registry)
    old = registry.active_version()
    new = train_tiny(tiny_registry, epochs=2, seed=1, tag="retrained")
    at = open_page()
    table = at.dataframe[0].value
    assert list(table["version"]) == [new, old]  # newest first
    assert list(table["active"]) == [False, True]
    assert table.loc[0, "threshold"] == registry.card(new)["threshold"]

    roc = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    curves = {trace["name"].split(":")[0]: trace for trace in roc if trace["name"] != "chance"}
    assert set(curves) == {new, f"{old} (active)"}
    stored = registry.card(new)["validation"]["predictions"]
    fpr, tpr, _ = metrics.roc_curve(stored["label"], stored["p_pneumonia"])
    assert curves[new]["x"] == list(fpr) and curves[new]["y"] == list(tpr)

    assert at.selectbox(key="models_selected").value == new  # the comparison opens on the newest other version
    compare = at.dataframe[1].value
    assert list(compare.columns) == ["", new, f"{old} (active)"]
    auc_row = compare[compare[""] == "Area under the ROC curve"].iloc[0]
    assert auc_row[new] == f"{registry.card(new)['validation']['roc_auc']:.3f}"
    assert at.button(key="models_rollback").disabled  # nothing was active before the first model

    # a tiny version validated on a handful of images fails the promotion gate: no one-click activation
    assert at.button(key="models_activate").disabled
    assert any("does not pass the promotion gate" in e.value and "evaluated on only" in e.value for e in at.error)
    gate = next(d.value for d in at.dataframe if "figure" in d.value.columns)
    assert list(gate["figure"]) == ["Sensitivity at its threshold", "Specificity at its threshold",
                                    "Area under the ROC curve"] and "n=" in gate.iloc[0][new]
    assert at.button(key="models_activate_override").disabled  # needs a reason and a confirmation
    at.text_input(key="models_override_reason").input("demonstration on the test fixtures").run()
    confirm = at.checkbox(key="models_override_confirm")
    assert f"will use {new} instead of {old}" in confirm.label  # says exactly what changes
    confirm.check().run()
    at = click(at, "models_activate_override")
    assert registry.active_version() == new
    assert any(f"Model {new} is now live in place of {old}" in s.value and "Override recorded" in s.value
               for s in at.success)
    assert registry.card(new)["activation_overrides"][-1]["reason"] == "demonstration on the test fixtures"
    assert audit_events()[-1]["event"] == "activation-override"
    assert list(at.dataframe[0].value["active"]) == [True, False]

    rollback = at.button(key="models_rollback")
    assert rollback.label == f"Roll back to {old}" and rollback.disabled  # confirmed, with a reason
    at.text_input(key="models_rollback_reason").input("override was a test").run()
    confirm = at.checkbox(key="models_rollback_confirm")
    assert f"will use {old} instead of {new}" in confirm.label
    confirm.check().run()
    at = click(at, "models_rollback")
    assert registry.active_version() == old
    message = next(s.value for s in at.success if "Rolled back" in s.value)
    assert f"model {old} is now live in place of {new}" in message and "again" not in message
    line = audit_events()[-1]
    assert (line["event"], line["version"], line["previous"], line["reason"]) == ("rollback", old, new,
                                                                                  "override was a test")


def audit_events() -> list[dict]:
    import os

    path = Path(os.environ["XRAY_AUDIT_LOG"])
    return [e for e in map(json.loads, path.read_text().splitlines()) if "event" in e]


def test_activation_that_passes_the_gate_is_confirmed_and_audited(tiny_registry, monkeypatch):
    from xray.govern import promotion

    for name, value in (("MIN_ACCEPTANCE_IMAGES", 1), ("MIN_PER_CLASS", 1), ("SENSITIVITY_MARGIN", 1.0),
                        ("AUC_MARGIN", 1.0)):
        monkeypatch.setattr(promotion, name, value)
    registry = Registry(tiny_registry)
    old = registry.active_version()
    new = train_tiny(tiny_registry, epochs=1, seed=2, tag="passing")
    at = open_page()
    assert at.button(key="models_activate").disabled  # not before the confirmation
    at.text_input(key="models_activate_reason").input("better on our films").run()
    at.checkbox(key="models_activate_confirm").check().run()
    at = click(at, "models_activate")
    assert registry.active_version() == new
    assert any(f"Model {new} is now live in place of {old}" in s.value for s in at.success)
    line = audit_events()[-1]
    assert (line["event"], line["version"], line["previous"], line["reason"]) == ("activation", new, old,
                                                                                  "better on our films")


def test_damaged_version_is_not_activated(tiny_registry):
    registry = Registry(tiny_registry)
    old = registry.active_version()
    new = train_tiny(tiny_registry, epochs=1, tag="damaged")
    weights = registry.version_dir(new) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    at = open_page()
    at.selectbox(key="models_selected").set_value(new).run()
    at.text_input(key="models_override_reason").input("test").run()
    at.checkbox(key="models_override_confirm").check().run()
    at = click(at, "models_activate_override")
    assert any("was not activated" in e.value and "damaged" in e.value for e in at.error)
    assert registry.active_version() == old


def test_empty_registry_says_how_to_get_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_WEIGHTS", str(tmp_path / "empty"))
    at = open_page()
    assert "No model versions yet" in at.info[0].value


def test_calibrate_to_this_site_shows_before_and_after_and_creates_a_version(tiny_registry, tmp_path, monkeypatch):
    import shutil

    from conftest import DATASET
    from xray.govern import promotion

    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 4)  # the one minimum: the gate's (sitecal requires it too)
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 8)
    monkeypatch.setenv("XRAY_DATA_ROOTS", str(tmp_path))
    site = tmp_path / "site"
    shutil.copytree(DATASET, site)
    registry = Registry(tiny_registry)
    active = registry.active_version()
    at = open_page()
    at.text_input(key="models_calibrate_folder").input(str(site)).run()
    assert not at.exception  # the version's sensitivity floor, promised on new films, needs more than 8 pneumonias
    assert any("lcb-sensitivity>=0.95 promises its floor" in e.value and "the folder has 8" in e.value for e in at.error)
    registry.update_card(active, {"threshold_rule": "youden"})  # a rule that promises nothing fits on 16 images
    at.text_input(key="models_calibrate_folder").input(str(site) + "/").run()
    assert not at.exception
    assert any("What the new threshold promises:** no promise on new films" in m.value for m in at.markdown)
    from xray.govern import promotion

    assert any(f"at least {promotion.MIN_ACCEPTANCE_IMAGES} readable films with {promotion.MIN_PER_CLASS} of each"
               in i.value for i in at.info)  # the minimum is said before the work starts
    table = next(d.value for d in at.dataframe if "after calibration" in d.value.columns)
    assert list(table[""]) == ["threshold", "sensitivity (95% CI)", "specificity (95% CI)"]
    at = click(at, "models_calibrate")
    new = [v for v in registry.versions() if v not in (active,)][-1]
    message = next(s.value for s in at.success if f"Created {new}" in s.value)
    # one set of figures: the preview, the new card (what the gate reads) and the message agree
    figures = promotion.acceptance_figures(registry.card(new))
    for row, key in (("sensitivity (95% CI)", "sensitivity"), ("specificity (95% CI)", "specificity")):
        shown = table[table[""] == row].iloc[0]["after calibration"].split()[0]
        assert shown == f"{figures[key].value:.3f}" and f"{key} {shown}" in message
    assert table[table[""] == "threshold"].iloc[0]["after calibration"] == f"{registry.card(new).threshold:.6f}"
    assert registry.card(new)["site_calibration"]["parent"] == active and registry.active_version() == active
    at.text_input(key="models_calibrate_folder").input(str(tmp_path.parent)).run()
    assert any("outside the allowed data folders" in e.value and "restart the server" in e.value for e in at.error)


def test_a_folder_under_the_gates_minimum_is_refused_before_decoding(tiny_registry, tmp_path, monkeypatch):
    import shutil

    from conftest import DATASET
    from xray.govern import sitecal

    monkeypatch.setenv("XRAY_DATA_ROOTS", str(tmp_path))
    site = tmp_path / "site"
    shutil.copytree(DATASET, site)
    decoded = []
    monkeypatch.setattr(sitecal, "decoded_dataset", lambda *a, **k: decoded.append(1))
    at = open_page()
    at.text_input(key="models_calibrate_folder").input(str(site)).run()
    assert any("needs at least 200 with 50 of each class" in e.value for e in at.error)
    assert not decoded


def test_adapt_to_this_site_says_what_changes_and_what_was_not_checked(tiny_registry, tmp_path, monkeypatch):
    import shutil

    from conftest import DATASET
    from xray.train import adapt

    monkeypatch.setattr(adapt, "MIN_FILMS", 8)
    monkeypatch.setenv("XRAY_DATA_ROOTS", str(tmp_path))
    site = tmp_path / "worklist"
    site.mkdir()
    for i, path in enumerate(sorted(DATASET.rglob("*.jp*g"))):  # the films without their labels' folders
        shutil.copy(path, site / f"film{i:02d}{path.suffix}")
    registry = Registry(tiny_registry)
    active = registry.active_version()
    at = open_page()
    at.text_input(key="models_adapt_folder").input(str(site)).run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "after adaptation" in d.value.columns)
    used, withheld = (int(v) for v in table.iloc[0]["before"].replace("(", "").replace(")", "").split())
    assert used + withheld == 16 and used >= 8 and "site prevalence, EM estimate" in list(table[""])
    assert any("Not checked:** No labels" in w.value for w in at.warning)
    at = click(at, "models_adapt")
    new = [v for v in registry.versions() if v != active][-1]
    assert any(f"Created {new}" in s.value for s in at.success)
    assert registry.card(new)["adaptation"]["used"] == used and registry.active_version() == active
