"""Who acts (xray.govern.identity): roles from claims or the site's roles file, expiry, the serving
refusal, and every governance entry point refusing a clinician with nothing changed."""
from __future__ import annotations

import json

import pytest

from xray import settings
from xray.govern import audit, identity, promotion, siteconfig, sitecal
from xray.govern.identity import ADMINISTRATOR, CLINICIAN, Actor, NotPermitted, SignInError
from xray.model.registry import Registry
from xray.train import jobs
from xray.train.config import TrainConfig

NOW = 1_800_000_000.0
ISSUER = "http://localhost:9/"


def claims(sub: str = "s-1", email: str = "ada@ward.example", **extra) -> dict:
    """What st.user holds after an OpenID Connect sign-in (ID token claims plus is_logged_in)."""
    return {"is_logged_in": True, "sub": sub, "email": email, "iss": ISSUER, "iat": NOW - 60, "exp": NOW + 3600,
            **extra}


ADMIN = Actor("s-admin", "ada@ward.example", ADMINISTRATOR, ISSUER)
CLIN = Actor("s-clin", "cleo@ward.example", CLINICIAN, ISSUER)


def test_role_from_a_claim_by_default_and_from_the_roles_file():
    assert identity.from_claims(claims(groups=["administrator"]), {}, NOW).role == ADMINISTRATOR
    assert identity.from_claims(claims(roles="clinician"), {}, NOW).role == CLINICIAN
    assert identity.from_claims(claims(groups=["clinician", "administrator"]), {}, NOW).role == ADMINISTRATOR
    table = {"claim": {"name": "groups", ADMINISTRATOR: ["xray-admins"], CLINICIAN: ["radiology"]},
             "users": {"Cleo@Ward.example": CLINICIAN}}
    assert identity.from_claims(claims(groups=["radiology"]), table, NOW).role == CLINICIAN
    assert identity.from_claims(claims(groups=["xray-admins"]), table, NOW).role == ADMINISTRATOR
    # a user named in the file gets that role whatever groups they carry; matched case-insensitively
    actor = identity.from_claims(claims(email="cleo@ward.example", groups=["xray-admins"]), table, NOW)
    assert actor == Actor("s-1", "cleo@ward.example", CLINICIAN, ISSUER)
    # an e-mail the provider marks unverified does not match the file
    with pytest.raises(SignInError, match="no role"):
        identity.from_claims(claims(email="cleo@ward.example", email_verified=False), table, NOW)


def test_no_known_user_is_a_sign_in_error_that_says_what_to_do():
    with pytest.raises(SignInError, match="nobody is signed in"):
        identity.from_claims({"is_logged_in": False}, {}, NOW)
    with pytest.raises(SignInError, match="no role.*groups claim carries superuser.*roles file"):
        identity.from_claims(claims(groups=["superuser"]), {"claim": {"name": "groups"}}, NOW)
    with pytest.raises(SignInError, match="unknown role 'superuser'"):
        identity.from_claims(claims(), {"users": {"ada@ward.example": "superuser"}}, NOW)
    with pytest.raises(SignInError, match="expired.*sign in again"):
        identity.from_claims(claims(groups=["administrator"], iat=NOW - 13 * 3600), {}, NOW, max_hours=12)
    assert identity.from_claims(claims(groups=["administrator"], iat=NOW - 11 * 3600), {}, NOW, max_hours=12)
    with pytest.raises(SignInError, match="no subject"):
        identity.from_claims({**claims(), "sub": ""}, {}, NOW)


def test_roles_file_is_read_in_settings(tmp_path, monkeypatch):
    path = tmp_path / "roles.toml"
    monkeypatch.setenv("XRAY_ROLES", str(path))
    assert settings.read_roles() == {}
    path.write_text('[users]\n"ada@ward.example" = "administrator"\n')
    assert identity.from_claims(claims(), None, NOW).role == ADMINISTRATOR
    path.write_text("[users\n")
    with pytest.raises(ValueError, match="roles file .*roles.toml cannot be read"):
        identity.from_claims(claims(), None, NOW)


def test_require_and_the_operator():
    assert identity.require(ADMIN, ADMINISTRATOR) is ADMIN and identity.require(CLIN, CLINICIAN) is CLIN
    with pytest.raises(NotPermitted, match="cleo@ward.example is signed in as a clinician: saving needs an "
                                           "administrator"):
        identity.require(CLIN, ADMINISTRATOR, "saving")
    with pytest.raises(NotPermitted, match="nobody is signed in"):
        identity.require(None, CLINICIAN)
    with pytest.raises(ValueError, match="unknown role"):
        identity.require(ADMIN, "root")
    me = identity.operator()
    assert me.local and me.role == ADMINISTRATOR and me.audit_fields()["issuer"] == "local"


@pytest.mark.parametrize("address, loopback", [("localhost", True), ("127.0.0.1", True), ("::1", True),
                                               ("[::1]", True), ("127.0.0.2", True), ("0.0.0.0", False),
                                               ("", False), (None, False), ("10.1.2.3", False), ("::", False),
                                               ("ward-pc.example", False), ("unix:///run/xray.sock", False)])
def test_loopback_addresses(address, loopback):
    assert identity.is_loopback(address) is loopback


def test_serving_refusal_is_one_line_naming_the_remedy():
    line = identity.serving_refusal("0.0.0.0", sign_in_configured=False, allow_unauthenticated=False)
    assert "\n" not in line and "[auth]" in line and "XRAY_ALLOW_UNAUTHENTICATED_NETWORK=1" in line
    assert "every network interface" in identity.serving_refusal(None, False, False)
    assert identity.serving_refusal("0.0.0.0", True, False) is None
    assert identity.serving_refusal("0.0.0.0", False, True) is None
    assert identity.serving_refusal("localhost", False, False) is None


def test_provider_down_is_said_in_words():
    from browser import free_port

    problem = identity.provider_problem(f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration", 2)
    assert problem.startswith("the sign-in service at 127.0.0.1:") and "does not answer" in problem


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_engine_refuses_a_clinician_and_records_the_administrator(tiny_registry, tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(log))
    registry = Registry(tiny_registry)
    version = registry.active_version()
    state = {p: p.read_bytes() for p in tiny_registry.rglob("*") if p.is_file()}
    with pytest.raises(NotPermitted, match="activating model"):
        promotion.promote(registry, version, force=True, reason="r", actor=CLIN)
    with pytest.raises(NotPermitted, match="rolling back"):
        promotion.rollback(registry, actor=CLIN)
    with pytest.raises(NotPermitted, match="saving the site's threshold"):
        siteconfig.save_threshold(registry, version, 0.3, "why", actor=CLIN)
    with pytest.raises(NotPermitted):
        siteconfig.restore_threshold(registry, version, actor=CLIN)
    with pytest.raises(NotPermitted):
        siteconfig.save_prevalence(registry, 0.2, actor=CLIN)
    with pytest.raises(NotPermitted, match="calibrating"):
        sitecal.calibrate(registry, str(tmp_path), actor=CLIN)
    with pytest.raises(NotPermitted, match="starting a training job"):
        jobs.start_job(tiny_registry, TrainConfig(data_dir=str(tmp_path)), actor=CLIN)
    with pytest.raises(NotPermitted, match="cancelling"):
        jobs.cancel_job(tiny_registry, actor=CLIN)
    assert {p: p.read_bytes() for p in tiny_registry.rglob("*") if p.is_file()} == state and not _lines(log)

    saved = siteconfig.save_threshold(registry, version, 0.3, "ward audit", actor=ADMIN)
    assert (saved.by, saved.subject) == ("ada@ward.example", "s-admin")
    assert registry.site.saved_threshold(version) == saved
    promotion.promote(registry, version, force=True, reason="same version", actor=ADMIN)
    line = _lines(log)[-2]
    assert line["event"] == "threshold-saved" and "by" not in line
    for line in _lines(log):
        assert (line["user"], line["email"], line["role"], line["issuer"]) == ("s-admin", "ada@ward.example",
                                                                               ADMINISTRATOR, ISSUER)


def test_every_shown_line_names_who_saw_it(tiny_model, tmp_path):
    from xray.serve.inference import Prediction

    log = tmp_path / "audit.jsonl"
    audit.AuditTrail(log, CLIN).shown("a" * 64, Prediction(0.7, tiny_model.version), 0.5)
    audit.AuditTrail(log).shown("b" * 64, Prediction(0.7, tiny_model.version), 0.5)  # the command line
    first, second = _lines(log)
    assert (first["user"], first["email"], first["role"]) == ("s-clin", "cleo@ward.example", CLINICIAN)
    assert (second["user"], second["issuer"]) == (identity.operator().subject, "local")
    assert tuple(first) == audit.FIELDS
