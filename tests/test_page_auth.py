"""Sign-in and roles on the pages without a browser (AppTest, st.user mocked): a clinician is offered no
governance action, a user with no role or an expired sign-in is told what to do and shown nothing, a
provider that is down is said so, sign-out forgets the session, and a non-loopback address without
[auth] is refused."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from browser import free_port

ROOT = Path(__file__).resolve().parent.parent


def auth(metadata_url: str = "http://localhost:9/.well-known/openid-configuration") -> dict:
    return {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "test-secret",
            "client_id": "xray", "client_secret": "s", "server_metadata_url": metadata_url}


def user(role: str | None, sub: str = "s-1", email: str = "cleo@ward.example", age_s: float = 60) -> dict:
    claims = {"is_logged_in": True, "sub": sub, "email": email, "iss": "http://localhost:9", "iat": time.time() - age_s}
    return {**claims, "groups": [role]} if role else claims


def app(page: str = "app.py", claims: dict | None = None, **auth_overrides) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.secrets["auth"] = auth(**auth_overrides)
    at.user = claims if claims is not None else {"is_logged_in": False}
    return at


def texts(at) -> str:
    return "\n".join(e.value for kind in (at.error, at.info, at.warning, at.caption, at.markdown) for e in kind)


def test_clinician_is_offered_no_governance_action(tiny_registry):
    at = app(claims=user("clinician")).run()
    assert not at.exception, at.exception
    assert "Signed in as **cleo@ward\\.example** (clinician)" in texts(at)
    keys = {w.key for w in at.button} | {w.key for w in at.text_input}
    assert not keys & {"diagnose_save_default", "diagnose_restore_threshold", "diagnose_save_prevalence",
                       "diagnose_save_why"}
    at.number_input(key="diagnose_threshold_exact").set_value(0.3).run()  # the session's own threshold: allowed
    assert at.number_input(key="diagnose_threshold_exact").value == 0.3
    models = app("pages/models.py", user("clinician")).run()
    assert not models.exception and "is for administrators" in texts(models)
    assert not {w.key for w in models.button} & {"models_activate", "models_rollback", "models_calibrate"}
    retrain = app("pages/retrain.py", user("clinician")).run()
    assert "Retraining is for administrators" in texts(retrain) and not retrain.button


def test_administrator_saves_the_site_threshold_under_their_sign_in(tiny_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    at = app(claims=user("administrator", sub="s-ada", email="ada@ward.example")).run()
    at.number_input(key="diagnose_threshold_exact").set_value(0.3).run()
    at.text_input(key="diagnose_save_why").input("ward audit").run()
    at.checkbox(key="diagnose_save_confirm").check().run()
    at.button(key="diagnose_save_default").click().run()
    assert not at.exception, at.exception
    site = next(iter(json.loads((tiny_registry / "site.json").read_text())["thresholds"].values()))
    assert (site["by"], site["subject"], site["why"]) == ("ada@ward.example", "s-ada", "ward audit")
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "threshold-saved" and (line["user"], line["email"]) == ("s-ada", "ada@ward.example")


@pytest.mark.parametrize("claims, said", [
    (user(None), "gives them no role"),
    (user("superuser"), "gives them no role (its roles/groups claim carries superuser)"),
    (user("administrator", age_s=13 * 3600), "has expired"),
])
def test_no_known_user_sees_what_to_do_and_nothing_else(tiny_registry, claims, said):
    at = app(claims=claims).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Sign in" and said in at.error[0].value.replace("\\", "")
    assert not at.get("file_uploader") and not at.sidebar.get("slider")
    assert {b.label for b in at.button} == {"Sign in again", "Sign out"}


def test_provider_down_is_said_and_nothing_happens(tiny_registry):
    at = app(metadata_url=f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration").run()
    assert [b.label for b in at.button] == ["Sign in"]
    at.button(key="sign_in").click().run()
    assert "Sign-in is not possible right now" in at.error[0].value and "does not answer" in at.error[0].value


def test_sign_out_forgets_the_session(tiny_registry):
    at = app(claims=user("clinician")).run()
    at.session_state["diagnose_results"] = {("a" * 64, "v"): "a film's result"}  # (AppTest reruns skip app.py)
    at.sidebar.button(key="sign_out").click().run()
    assert not at.exception, at.exception
    assert "diagnose_results" not in at.session_state and "audit_trail" not in at.session_state
    assert at.title[0].value == "Sign in"


def test_local_mode_is_the_operator_without_sign_in(tiny_registry):
    from xray.govern.identity import operator

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception and at.get("file_uploader")
    assert f"Local mode: {operator().label} (administrator)" in texts(at)


def test_a_network_address_without_sign_in_is_refused(tiny_registry, tmp_path, monkeypatch):
    import streamlit as st

    from pages import common

    stops, get_option = [], st.get_option
    monkeypatch.setattr(common, "stop_server", lambda delay_s=0: stops.append(1))
    monkeypatch.setattr(st, "get_option", lambda key: "0.0.0.0" if key == "server.address" else get_option(key))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert len(at.error) == 1 and at.error[0].value.startswith("Refusing to serve address 0.0.0.0 without sign-in")
    assert "XRAY_ALLOW_UNAUTHENTICATED_NETWORK=1" in at.error[0].value
    assert not at.get("file_uploader") and stops == [1]  # nothing served; the server asked to stop

    monkeypatch.setenv("XRAY_ALLOW_UNAUTHENTICATED_NETWORK", "1")  # the operator accepts the risk: logged
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception and at.get("file_uploader")
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert "unauthenticated-network-serving" in events


def test_xsrf_protection_stays_on():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["enableXsrfProtection"] is True  # and Streamlit forces it on whenever [auth] is set
    assert ".streamlit/secrets.toml" in (ROOT / ".gitignore").read_text().splitlines()  # no secret committed


def test_a_broken_sign_in_configuration_does_not_fall_back_to_no_sign_in(tiny_registry, tmp_path):
    from streamlit import config

    broken = tmp_path / "secrets.toml"
    broken.write_text('[auth\nclient_id = "x"\n')
    before = config.get_option("secrets.files")
    config.set_option("secrets.files", [str(broken)])
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    finally:
        config.set_option("secrets.files", before)
    assert "sign-in configuration (.streamlit/secrets.toml) cannot be read" in at.error[0].value
    assert not at.get("file_uploader") and not at.exception
