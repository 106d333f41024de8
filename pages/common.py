"""UI helpers shared by the pages: who is at the screen (sign-in, role), the model (loaded once per
process), the session's operating threshold (one owner: ``THRESHOLD_KEY``) and the session's audit trail
(what was shown is what is logged)."""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import streamlit as st

from xray import settings
from xray.govern import identity
from xray.govern.audit import AuditTrail, record_event
from xray.govern.identity import ADMINISTRATOR, Actor
from xray.model.registry import LoadedModel, ModelFileError, Registry

# The one owner of the operating threshold in the app: a plain session value, set from the card and
# changed only by the threshold widgets' callbacks. Everything shown, logged or exported reads it.
THRESHOLD_KEY = "threshold"
THRESHOLD_MODEL_KEY = "threshold_model"  # (version, card threshold) the session value was set against
APP_NAVIGATION_KEY = "app_navigation"  # set by app.py: this session has its navigation
PRESET_RULES = {"High sensitivity": "sensitivity>=0.99",  # find at least 99% of validation pneumonia
                "High specificity": "specificity>=0.98"}  # call at most 2% of validation normals pneumonia
PRESET_MIN_GAP = 0.02  # presets closer than this to another are not offered: they are the same choice
AUDIT_KEY = "audit_trail"  # this session's xray.govern.audit.AuditTrail
RETURN_TO_KEY = "app_return_to"  # the page a visit in legacy mode asked for (see ensure_app_navigation)
SIGN_IN_PROBLEM_KEY = "sign_in_problem"  # why the last sign-in attempt did not start (provider down)
LOG = logging.getLogger("xray.app")


# -- who is at the screen -------------------------------------------------------------------------------
def auth_section() -> dict:
    """The ``[auth]`` table of .streamlit/secrets.toml ({} when sign-in is not configured)."""
    try:
        section = st.secrets.get("auth") if "auth" in st.secrets else None
    except FileNotFoundError as exc:  # StreamlitSecretNotFoundError: no secrets file, or one that does not parse
        if getattr(exc, "error_id", "no-secrets-found") == "no-secrets-found":
            return {}
        # a sign-in configuration that cannot be read must not fall back to working without sign-in
        LOG.error("The sign-in configuration cannot be read: %s", exc)
        st.error(f"The sign-in configuration (.streamlit/secrets.toml) cannot be read: {escape_markdown(str(exc))}. "
                 "Nothing is shown until an administrator corrects it (README 'Sign-in').", icon=":material/lock:")
        st.stop()
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def sign_in_configured() -> bool:
    return bool(auth_section())


def _provider() -> tuple[str | None, str]:
    """(provider name for ``st.login``, its discovery URL): the unnamed ``[auth]`` provider, else the first
    named ``[auth.NAME]`` one."""
    section = auth_section()
    if "server_metadata_url" in section or "client_id" in section:
        return None, str(section.get("server_metadata_url", ""))
    for name, value in section.items():
        if isinstance(value, dict) and "server_metadata_url" in value:
            return name, str(value["server_metadata_url"])
    return None, ""


def refuse_unsafe_serving() -> None:
    """app.py's first step: serving a non-loopback address without sign-in is refused.

    Streamlit runs app.py for every browser session and nothing else produces a page, so no film, result
    or action is served before this check. On refusal the one line goes to the server log and the page,
    and the server process ends (``stop_server``): the first visit ends it. An operator who accepted the risk
    (XRAY_ALLOW_UNAUTHENTICATED_NETWORK=1) gets a warning in the log and one audit line per server start.
    """
    address = st.get_option("server.address")
    configured = sign_in_configured()
    allowed = settings.allow_unauthenticated_network()
    refusal = identity.serving_refusal(address, configured, allowed)
    if refusal:
        LOG.error(refusal)  # the server log (stderr)
        st.navigation([st.Page(_signing_in, title="Refused", url_path="refused")], position="hidden")
        st.error(refusal, icon=":material/lock:")
        stop_server(delay_s=2.0)  # time for this page to reach the browser
        st.stop()
    if allowed and not configured and not identity.is_loopback(address):
        _note_unauthenticated_network(str(address))


def stop_server(delay_s: float = 0.0) -> None:
    """End the ``streamlit run`` process as Ctrl+C would (SIGTERM: Streamlit closes its sessions and exits),
    after ``delay_s``. Runtime.stop() alone leaves the HTTP server listening. Under AppTest the runtime is a
    stand-in: nothing happens."""
    import signal
    import threading

    from streamlit import runtime
    from streamlit.runtime import Runtime

    if runtime.exists() and type(runtime.get_instance()) is Runtime:
        threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGTERM)).start()


@st.cache_resource(show_spinner=False)
def _note_unauthenticated_network(address: str) -> bool:
    """Log (once per server process) that the operator serves a network address without sign-in."""
    line = (f"Serving {address or 'every interface'} WITHOUT sign-in because XRAY_ALLOW_UNAUTHENTICATED_NETWORK "
            "is set: anyone who reaches this port acts as the machine's operator (administrator).")
    LOG.warning(line)
    try:
        record_event("unauthenticated-network-serving", address=address)
    except OSError:
        pass
    return True


def current_actor(in_app: bool = False) -> Actor:
    """Who is at the screen: the signed-in user with their role, or (no ``[auth]``, local mode) the
    machine's operator. Without a known user the page says what happened and what to do, and stops
    (``in_app``: app.py's call, which also hides the page list)."""
    if not sign_in_configured():
        return identity.operator()
    try:
        return identity.from_claims(st.user.to_dict())
    except ValueError as exc:  # SignInError, a broken roles file or XRAY_SIGN_IN_HOURS
        if in_app:  # a navigation of one hidden page: no list of page files (legacy mode) beside the sign-in
            st.navigation([st.Page(_signing_in, title="Sign in", url_path="sign-in")], position="hidden")
        sign_in_page(str(exc))
        st.stop()


def _signing_in() -> None:
    """The placeholder page of the navigation shown while nobody is signed in or serving is refused (never run)."""


def sign_in_page(problem: str) -> None:
    """The page shown instead of the app while nobody usable is signed in."""
    st.title("Sign in")
    st.caption("Pneumonia X-ray assistant: sign in with your hospital account to see films and results.")
    signed_in = bool(st.user.get("is_logged_in"))
    if signed_in:
        st.error(f"You cannot use the assistant yet: {escape_markdown(problem)}.", icon=":material/person_off:")
    attempt = st.session_state.pop(SIGN_IN_PROBLEM_KEY, None)
    if attempt:
        st.error(attempt, icon=":material/cloud_off:")
    left, right, _ = st.columns([1, 1, 3])
    left.button("Sign in again" if signed_in else "Sign in", key="sign_in", type="primary", on_click=sign_in,
                icon=":material/login:")
    if signed_in:
        right.button("Sign out", key="sign_out_blocked", on_click=sign_out, icon=":material/logout:")


def sign_in() -> None:
    """Start the provider's sign-in; when the provider does not answer, say so instead of a blank error."""
    name, url = _provider()
    problem = identity.provider_problem(url) if url else "sign-in is configured without a server_metadata_url"
    if problem:
        st.session_state[SIGN_IN_PROBLEM_KEY] = (
            f"Sign-in is not possible right now: {escape_markdown(problem)}. Nothing was done. Try again in a few "
            "minutes; if it persists, tell IT that the identity provider is unreachable from this server.")
        return
    st.login(name)


def sign_out() -> None:
    """Forget everything this session held (films, results, settings) and sign out at the provider."""
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    st.logout()


def identity_sidebar(actor: Actor) -> None:
    """Who is signed in, their role and the sign-out button (local mode: the OS login, no sign-out)."""
    with st.sidebar:
        if actor.local:
            st.caption(f"Local mode: {escape_markdown(actor.label)} ({actor.role}), no sign-in.")
        else:
            st.caption(f"Signed in as **{escape_markdown(actor.label)}** ({actor.role}).")
            st.button("Sign out", key="sign_out", on_click=sign_out, icon=":material/logout:")


def is_administrator(actor: Actor, what: str = "") -> bool:
    """True for an administrator; otherwise, with ``what``, a note that it is for administrators."""
    if actor.may(ADMINISTRATOR):
        return True
    if what:
        st.info(f"{what} is for administrators; you are signed in as {actor.role}.", icon=":material/lock:")
    return False


def ensure_app_navigation() -> None:
    """Send a page opened without app.py to app.py; every page calls this first.

    Because a ``pages/`` folder exists, a freshly started server answers the first visit to a page
    URL (e.g. /about) in Streamlit's legacy multipage mode, which skips app.py: no wide layout, and
    every file in pages/ (common.py included) listed as a page. The first run of app.py's
    ``st.navigation`` ends that mode for the process. (AppTest re-enters that mode on every run;
    a session that has been through app.py is left alone.)
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
        legacy = bool(PagesManager.uses_pages_directory)
    except (ImportError, AttributeError):  # a later Streamlit without the legacy mode
        legacy = False
    if legacy and not st.session_state.get(APP_NAVIGATION_KEY):
        # remember which page was asked for: app.py opens it once its navigation exists (a bookmark
        # to /about on a fresh server lands on About, not on Diagnose)
        here = Path(__file__).resolve()
        for frame in inspect.stack()[1:]:  # the page script that is running (not this helper module)
            caller = Path(frame.filename).resolve()
            if caller.parent == here.parent and caller != here:
                st.session_state[RETURN_TO_KEY] = f"pages/{caller.name}"
                break
        st.switch_page("app.py")


def model_cache_key() -> tuple[str, str | None, int, int]:
    """Changes when a version is activated, its card edited, or the site saves or restores a threshold."""
    return Registry().state_key()


@st.cache_resource(max_entries=2, show_spinner="Loading the model...")
def _load(root: str, version: str | None, card_mtime_ns: int, site_mtime_ns: int) -> tuple[LoadedModel, list[str]]:
    # The arguments are the cache key only; load_with_fallback reads the registry itself.
    return Registry(root).load_with_fallback()


def get_model() -> tuple[LoadedModel, list[str]]:
    """The active model (or the newest good earlier one) and the warnings about any it skipped.

    Raises:
        ModelFileError: there is no loadable model at all (see ``require_model``).
    """
    return _load(*model_cache_key())


def require_model(withdraw=None) -> LoadedModel:
    """The model, with its load warnings shown; without one, a clear message and the page stops (after
    emptying ``withdraw``, an ``st.empty`` holding what was drawn before the model but needs one: an uploader)."""
    ensure_app_navigation()
    try:
        model, problems = get_model()
    except ModelFileError as exc:
        if withdraw is not None:
            withdraw.empty()
        st.error("No model is available, so no image can be analysed.  \n"
                 f"Reason: {exc}.  \nTrain one on the Retrain page or with `python -m xray train`, "
                 "or point $XRAY_WEIGHTS at a model registry.", icon=":material/error:")
        st.stop()
    for problem in problems:
        st.warning(f"{problem}. Using model {model.version} instead.", icon=":material/warning:")
    return model


def current_threshold(model: LoadedModel) -> float:
    """The session's threshold; starts at (and returns to) the default (the site's saved threshold, else
    the card's) when the model or that default changes."""
    origin = (model.version, model.default_threshold)
    if st.session_state.get(THRESHOLD_MODEL_KEY) != origin or THRESHOLD_KEY not in st.session_state:
        st.session_state[THRESHOLD_KEY] = model.default_threshold
        st.session_state[THRESHOLD_MODEL_KEY] = origin
    return float(st.session_state[THRESHOLD_KEY])


def set_threshold(value: float) -> None:
    st.session_state[THRESHOLD_KEY] = float(value)


def validation_predictions(model: LoadedModel) -> tuple[list[int], list[float]] | None:
    """(labels, p_pneumonia) stored in the card (parsed once, ``xray.model.card.Validation``), or None."""
    validation = model.card.validation
    if validation.labels is None:
        return None
    return list(validation.labels), list(validation.scores)


def audit_trail() -> AuditTrail:
    """This session's audit trail (one line per distinct result shown)."""
    actor = current_actor()
    if AUDIT_KEY not in st.session_state or st.session_state[AUDIT_KEY].actor != actor:  # (a role changed)
        st.session_state[AUDIT_KEY] = AuditTrail(actor=actor)
    return st.session_state[AUDIT_KEY]


def record_shown(sha256: str, prediction, threshold: float, shown_in: str = "screen") -> bool:
    """Log a result about to be displayed at ``threshold``; False (with the reason on the page) when
    the log cannot be written: an unaudited result is not shown."""
    try:
        audit_trail().shown(sha256, prediction, threshold, shown_in)
    except OSError as exc:
        st.error(f"Result withheld: the audit log cannot be written ({escape_markdown(str(exc))}). "
                 "Ask your administrator to check the audit log folder ($XRAY_AUDIT_LOG).",
                 icon=":material/error:")
        return False
    return True


_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:=\"'&")


def escape_markdown(text: str) -> str:
    """User-supplied text (file names, DICOM values) shown literally inside Streamlit markdown."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in " ".join(str(text).split()))


def rule_in_words(rule: str) -> str:
    """A threshold rule (``xray.decide.metrics.choose_threshold``) as a clinician would say it."""
    for prefix, words in (("min-sensitivity>=", "the most specific threshold that still finds at least {:.0%} of "
                                                "pneumonia films, also when exposure or framing change"),
                          ("sensitivity>=", "the most specific threshold that finds at least {:.0%} of pneumonia "
                                            "films"),
                          ("specificity>=", "the most sensitive threshold that calls at least {:.0%} of normal films "
                                            "normal")):
        if rule.startswith(prefix):
            try:
                return words.format(float(rule[len(prefix):].split()[0]))
            except ValueError:
                return rule
    if rule == "youden":
        return "the threshold that best balances sensitivity and specificity (Youden's index)"
    return rule
