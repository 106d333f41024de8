"""The site's choices, each one audited: the operating threshold a site saves for a version (and the model's
own restored), and the site's pneumonia prevalence. The values live in ``xray.model.site`` (``site.json``
beside the registry); this module is the one way a person changes them, so every change leaves one audit
line (who, what, why) before anyone sees its effect.
"""
from __future__ import annotations

from xray.govern import audit
from xray.model.card import ModelCard
from xray.model.registry import Registry
from xray.model.site import SavedThreshold


def save_threshold(registry: Registry, version: str, threshold: float, why: str, *, by: str) -> SavedThreshold:
    """Save ``threshold`` as the site's default for ``version`` (the card is never changed), by ``by``, because
    ``why``; audited (``threshold-saved``).

    Raises:
        ValueError: a threshold outside [0, 1], or no name or no reason.
        OSError: the settings or the audit log cannot be written.
    """
    saved = registry.site.save_threshold(version, threshold, by, why)
    audit.record_event("threshold-saved", version=version, threshold=saved.threshold, by=saved.by, why=saved.why)
    return saved


def restore_threshold(registry: Registry, version: str, *, by: str = "") -> bool:
    """Forget the site's threshold for ``version`` (the card's comes back, exactly); audited
    (``threshold-restored``). False when the site had none (nothing written).

    Raises:
        ModelFileError: the version's card cannot be read.
        OSError: the settings or the audit log cannot be written.
    """
    card_threshold = registry.card(version).threshold  # what comes back
    if not registry.site.restore_threshold(version):
        return False
    audit.record_event("threshold-restored", version=version, threshold=card_threshold, by=by.strip())
    return True


def save_prevalence(registry: Registry, prevalence: float, *, by: str = "") -> float:
    """Save the site's pneumonia prevalence; audited (``prevalence-saved``).

    Raises:
        ValueError: a prevalence outside (0, 1).
        OSError: the settings or the audit log cannot be written.
    """
    registry.site.set_prevalence(prevalence)
    audit.record_event("prevalence-saved", prevalence=float(prevalence), by=by.strip())
    return float(prevalence)


def site_prevalence(registry: Registry, card: ModelCard) -> float:
    """The prevalence results are read at: the site's saved one, else the version's calibration prevalence."""
    return registry.site.prevalence_in_force(card.calibration_prevalence)
