"""Site settings (xray.model.site): the site's saved threshold and prevalence, kept apart from the versions."""
from __future__ import annotations

import json

import pytest

from xray.model.site import SITE_FILE, SiteSettings


def test_a_saved_threshold_comes_back_exactly_and_restore_forgets_it(tmp_path):
    site = SiteSettings(tmp_path)
    assert site.saved_threshold("v1") is None and not site.restore_threshold("v1")
    saved = site.save_threshold("v1", 0.123456789012, " Dr A ", " fewer misses ")
    assert (saved.threshold, saved.by, saved.why) == (0.123456789012, "Dr A", "fewer misses")
    again = SiteSettings(tmp_path).saved_threshold("v1")
    assert again == saved and again.provenance() == f"saved by Dr A on {saved.at[:10]}: fewer misses"
    assert SiteSettings(tmp_path).saved_threshold("v2") is None  # per version
    assert site.restore_threshold("v1") and site.saved_threshold("v1") is None


@pytest.mark.parametrize("threshold, by, why, message", [(1.5, "a", "b", "between 0 and 1"), (-0.1, "a", "b", "between"),
                                                          (0.5, " ", "b", "who saves"), (0.5, "a", "", "who saves")])
def test_a_threshold_needs_a_value_in_range_a_name_and_a_reason(tmp_path, threshold, by, why, message):
    with pytest.raises(ValueError, match=message):
        SiteSettings(tmp_path).save_threshold("v1", threshold, by, why)
    assert not (tmp_path / SITE_FILE).exists()  # nothing written




def test_prevalence_is_saved_cleared_and_ranked(tmp_path):
    site = SiteSettings(tmp_path)
    assert site.prevalence() is None and site.prevalence_in_force(0.74) == 0.74
    site.set_prevalence(0.2)
    assert SiteSettings(tmp_path).prevalence() == 0.2 and site.prevalence_in_force(0.74) == 0.2
    assert site.prevalence_in_force(0.74, given=0.05) == 0.05  # e.g. --prevalence wins
    with pytest.raises(ValueError, match="strictly between"):
        site.prevalence_in_force(0.74, given=1.0)
    with pytest.raises(ValueError, match="strictly between"):
        site.set_prevalence(0.0)
    site.set_prevalence(None)
    assert site.prevalence() is None


def test_settings_of_both_kinds_share_one_file_and_survive_each_other(tmp_path):
    site = SiteSettings(tmp_path)
    site.save_threshold("v1", 0.4, "a", "b")
    site.set_prevalence(0.3)
    state = json.loads((tmp_path / SITE_FILE).read_text())
    assert state["prevalence"] == 0.3 and state["thresholds"]["v1"]["threshold"] == 0.4
    site.restore_threshold("v1")
    assert site.prevalence() == 0.3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"prevalence": "high", "thresholds": {"v1": "x"}}',
                                     '{"prevalence": 1.5, "thresholds": {"v1": {"by": "a"}}}'])
def test_a_damaged_site_file_reads_as_no_setting(tmp_path, content):
    (tmp_path / SITE_FILE).write_text(content)
    site = SiteSettings(tmp_path)
    assert site.prevalence() is None and site.saved_threshold("v1") is None
