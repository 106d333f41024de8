"""Sign-in in a real browser against a real OpenID Connect provider: `streamlit run app.py` with an [auth]
section, the `oidc-provider-mock` provider on loopback, Debian's Chromium driven by Playwright. An
administrator and a clinician sign in; the clinician is offered no governance action; every audit line
names who was at the screen; sign-out clears the session; no token or cookie reaches a log."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from browser import free_port, new_page, require_browser, streamlit_app
from conftest import FULLRES

SAMPLE = FULLRES / "NORMAL2-IM-1438-0001.jpeg"
ADA = ("ada-7f3", {"email": "ada@ward.example", "email_verified": True, "name": "Ada Admin", "groups": ["xray-admins"]})
CLEO = ("cleo-19c", {"email": "cleo@ward.example", "email_verified": True, "name": "Cleo Clinician",
                     "groups": ["radiology"]})
ROLES = """[claim]
name = "groups"
administrator = ["xray-admins"]

[users]
"cleo@ward.example" = "clinician"
"""


@pytest.fixture(scope="module")
def provider():
    """A real OpenID Connect provider (discovery, authorization code flow, ID tokens, end-session) on loopback."""
    mock = pytest.importorskip("oidc_provider_mock")
    users = [mock.User(sub=sub, claims=claims) for sub, claims in (ADA, CLEO)]
    with mock.run_server_in_thread(port=free_port(), user_claims=users) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def signed_app(provider, tiny_registry, tmp_path):
    """app.py on loopback with [auth] pointing at the provider and a roles file; yields (url, audit log, server log)."""
    require_browser()
    pytest.importorskip("authlib")
    port = free_port()
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(f"""[auth]
redirect_uri = "http://localhost:{port}/oauth2callback"
cookie_secret = "{secrets.token_hex(32)}"
client_id = "xray-assistant"
client_secret = "{secrets.token_hex(16)}"
server_metadata_url = "{provider}/.well-known/openid-configuration"
""")
    (tmp_path / "roles.toml").write_text(ROLES)
    env = {"XRAY_WEIGHTS": str(tiny_registry), "XRAY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
           "XRAY_ROLES": str(tmp_path / "roles.toml")}
    log = tmp_path / "streamlit.log"
    with streamlit_app(log, env, ("--secrets.files", str(secrets_file)), port) as url:
        yield url, tmp_path / "audit.jsonl", log


def settled(page) -> None:
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)


def sign_in(page, url: str, sub: str) -> None:
    """From the app's sign-in page through the provider's form, back to the app."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("button", name="Sign in").click()
    page.locator(f'button[name="sub"][value="{sub}"]').click()  # the provider's one-click user
    page.wait_for_url(f"{url}/**")
    page.get_by_text("Signed in as").wait_for()
    settled(page)


def sign_out(page, url: str) -> None:
    page.locator('[data-testid="stSidebar"]').get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/oauth2/end_session**")  # the provider ends its session too (RP-initiated logout)
    page.get_by_role("button", name="End session").click()
    page.wait_for_url(f"{url}/**")
    page.get_by_role("button", name="Sign in").wait_for()


def show_sample(page) -> None:
    page.locator('input[type="file"]').set_input_files(str(SAMPLE))
    page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]').first.wait_for(timeout=120_000)
    settled(page)


@pytest.mark.browser
@pytest.mark.slow
def test_administrator_and_clinician_sign_in_roles_audit_and_sign_out(signed_app):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, audit_log, server_log = signed_app
    with sync_api.sync_playwright() as p:
        browser, page = new_page(p)
        try:
            page.goto(url, wait_until="domcontentloaded")  # nobody signed in: the sign-in page and nothing else
            page.get_by_role("button", name="Sign in").wait_for()
            assert page.locator('input[type="file"]').count() == 0

            sign_in(page, url, ADA[0])
            sidebar = page.locator('[data-testid="stSidebar"]')
            sync_api.expect(sidebar).to_contain_text("ada@ward.example (administrator)")
            sync_api.expect(sidebar.get_by_role("link", name="Retrain")).to_be_visible()
            sync_api.expect(sidebar.get_by_text("Save this threshold for this site")).to_be_visible()
            show_sample(page)
            cookies = [c["value"] for c in page.context.cookies() if c["name"].startswith("_streamlit_user")]
            assert cookies
            sidebar.get_by_role("link", name="Models").click()
            page.get_by_role("button", name="Roll back").wait_for()

            sign_out(page, url)  # the session's films and results go with it
            assert page.locator('input[type="file"]').count() == 0
            assert not [c for c in page.context.cookies() if c["name"].startswith("_streamlit_user")]

            sign_in(page, url, CLEO[0])
            sync_api.expect(sidebar).to_contain_text("cleo@ward.example (clinician)")
            sync_api.expect(page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]')).to_have_count(0)
            sync_api.expect(sidebar.get_by_role("link", name="Retrain")).to_have_count(0)
            sync_api.expect(sidebar.get_by_text("Save this threshold for this site")).to_have_count(0)
            show_sample(page)
            sidebar.get_by_role("link", name="Models").click()
            page.get_by_text("is for administrators").wait_for()
            sync_api.expect(page.get_by_role("button", name="Roll back")).to_have_count(0)
            sync_api.expect(page.get_by_role("button", name="Activate")).to_have_count(0)
        finally:
            browser.close()

    lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
    shown = {(line["user"], line["email"], line["role"]) for line in lines if "sha256" in line}
    assert shown == {(ADA[0], "ada@ward.example", "administrator"), (CLEO[0], "cleo@ward.example", "clinician")}
    assert all(line["issuer"].startswith("http://localhost:") for line in lines)
    written = audit_log.read_text() + server_log.read_text()
    assert not any(cookie in written for cookie in cookies)
    assert "id_token" not in written and "access_token" not in written


@pytest.mark.browser
@pytest.mark.slow
def test_a_network_address_without_sign_in_is_refused_by_the_real_server(tiny_registry, tmp_path):
    """`streamlit run app.py --server.address 0.0.0.0` with no [auth], in a private network namespace whose
    only interface is its own loopback (nothing outside the machine, or outside the namespace, can reach it)."""
    require_browser()
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(
            ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True).returncode:
        pytest.skip("cannot make a private network namespace here (unshare -n, ip from iproute2)")
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry), "XRAY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
           "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("XRAY_ALLOW_UNAUTHENTICATED_NETWORK", None)
    probe = [sys.executable, str(Path(__file__).with_name("serve_probe.py")), str(tmp_path / "streamlit.log")]
    done = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *probe], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    refusals = [line for line in result["log"].splitlines() if line.startswith("Refusing to serve")]
    assert refusals == ["Refusing to serve address 0.0.0.0 without sign-in: configure OpenID Connect in "
                        ".streamlit/secrets.toml [auth] (README 'Sign-in'), or bind to localhost (server.address = "
                        "\"localhost\"), or set XRAY_ALLOW_UNAUTHENTICATED_NETWORK=1 to accept the risk."], result["log"]
    assert not result["still_running"]  # the server ended on the first visit
    assert "Refusing to serve address 0.0.0.0 without sign-in" in result["page"]  # the browser is told too
    assert "Diagnose" not in result["page"] and "Drop chest X-rays" not in result["page"]
    assert not (tmp_path / "audit.jsonl").exists()  # nothing was shown, so nothing was logged
