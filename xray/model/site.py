"""Site settings kept beside a registry, apart from the model versions: the threshold a site chose for a
version (who, when, why) and the site's pneumonia prevalence. The shipped versions' cards are never
edited; "restore" removes the site's value and the card's own comes back exactly.

File: ``<registry root>/site.json``, written atomically. Who may change it is decided above this wing
(``xray.govern.siteconfig`` checks the role and passes the signed-in identity down as plain data).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from xray.clock import utc_now
from xray.atomic import atomic_write_json

SITE_FILE = "site.json"


@dataclass(frozen=True)
class SavedThreshold:
    """A threshold a site saved for one model version."""

    version: str
    threshold: float  # exact, in [0, 1]
    by: str  # who saved it: the signed-in user's e-mail (or name), the OS login in local mode
    at: str  # UTC time, ISO 8601
    why: str  # the reason given
    subject: str = ""  # the identity provider's subject of ``by`` ("" in local mode and in older files)

    def provenance(self) -> str:
        """Who saved it, when and why, in one line."""
        return f"saved by {self.by} on {self.at[:10]}: {self.why}"


class SiteSettings:
    """Read and write ``site.json`` of one registry root."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / SITE_FILE

    def _state(self) -> dict:
        try:
            state = json.loads(self.path.read_text())
            return state if isinstance(state, dict) else {}
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def saved_threshold(self, version: str) -> SavedThreshold | None:
        entry = self._state().get("thresholds", {}).get(version)
        if not isinstance(entry, dict):
            return None
        try:
            return SavedThreshold(version, float(entry["threshold"]), str(entry.get("by", "")),
                                  str(entry.get("at", "")), str(entry.get("why", "")), str(entry.get("subject", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def save_threshold(self, version: str, threshold: float, by: str, why: str, subject: str = "") -> SavedThreshold:
        """Record the site's threshold for ``version``, saved by ``by`` (provider ``subject``) because ``why``.

        Raises:
            ValueError: a threshold outside [0, 1], or no name or no reason given.
        """
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("the threshold must lie between 0 and 1")
        if not by.strip() or not why.strip():
            raise ValueError("say who saves the threshold and why")
        saved = SavedThreshold(version, threshold, by.strip(), utc_now(), why.strip(), subject.strip())
        state = self._state()
        state.setdefault("thresholds", {})[version] = {k: v for k, v in asdict(saved).items() if k != "version"}
        atomic_write_json(self.path, state)
        return saved

    def restore_threshold(self, version: str) -> bool:
        """Forget the site's threshold for ``version``; True when there was one."""
        state = self._state()
        if version not in state.get("thresholds", {}):
            return False
        del state["thresholds"][version]
        atomic_write_json(self.path, state)
        return True

    def prevalence(self) -> float | None:
        """The site's pneumonia prevalence, or None when not set (the card's training prevalence applies)."""
        value = self._state().get("prevalence")
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if 0.0 < value < 1.0 else None

    def prevalence_in_force(self, calibration_prevalence: float, given: float | None = None) -> float:
        """The pneumonia prevalence adjusted figures assume: ``given`` (e.g. ``--prevalence``), else the site's
        saved one, else the version's calibration prevalence (``ModelCard.calibration_prevalence``).

        Raises:
            ValueError: ``given`` outside (0, 1).
        """
        if given is not None:
            if not 0.0 < given < 1.0:
                raise ValueError("the prevalence must lie strictly between 0 and 1")
            return float(given)
        saved = self.prevalence()
        return saved if saved is not None else float(calibration_prevalence)

    def set_prevalence(self, prevalence: float | None) -> None:
        """Save (or with None, clear) the site's prevalence.

        Raises:
            ValueError: a prevalence outside (0, 1).
        """
        state = self._state()
        if prevalence is None:
            state.pop("prevalence", None)
        else:
            prevalence = float(prevalence)
            if not 0.0 < prevalence < 1.0:
                raise ValueError("the prevalence must lie strictly between 0 and 1")
            state["prevalence"] = prevalence
        atomic_write_json(self.path, state)
