"""UI helpers shared by the pages: the model (loaded once per process), the session's operating
threshold (one owner: ``THRESHOLD_KEY``) and the session's audit trail (what was shown is what is logged)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import streamlit as st

from xray.govern.audit import AuditTrail
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
    """(registry root, active version, card mtime, site settings mtime): changes when a version is
    activated, its card edited, or the site saves or restores a threshold."""
    registry = Registry()
    version = registry.active_version()

    def mtime(path) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return 0

    card = mtime(registry.version_dir(version) / "card.json") if version is not None else 0
    return str(registry.root.resolve()), version, card, mtime(registry.site.path)


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


def require_model() -> LoadedModel:
    """The model, with its load warnings shown; without one, a clear message and the page stops."""
    ensure_app_navigation()
    try:
        model, problems = get_model()
    except ModelFileError as exc:
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
    if AUDIT_KEY not in st.session_state:
        st.session_state[AUDIT_KEY] = AuditTrail()
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
