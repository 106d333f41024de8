"""The site's saved threshold and prevalence, changed by administrators only: each change checks the role
(``identity.require``), records the signed-in identity with the value (``xray.model.site``) and writes one
audit line (``threshold-saved``, ``threshold-restored``, ``prevalence-saved``).

A clinician changes the session's own threshold and prevalence on the page; these calls change the
default for everyone at the site.
"""
from __future__ import annotations

from xray.govern import audit
from xray.govern.identity import ADMINISTRATOR, Actor, require
from xray.model.registry import Registry
from xray.model.site import SavedThreshold


def save_threshold(registry: Registry, version: str, threshold: float, why: str, *, actor: Actor) -> SavedThreshold:
    """Save ``threshold`` as the site's default for ``version``, by ``actor``, because ``why``.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is saved).
        ValueError: a threshold outside [0, 1] or no reason.
        OSError: the site file or the audit line cannot be written.
    """
    require(actor, ADMINISTRATOR, "saving the site's threshold")
    saved = registry.site.save_threshold(version, threshold, actor.label, why, actor.subject)
    audit.record_event("threshold-saved", actor=actor, version=version, threshold=saved.threshold, why=saved.why)
    return saved


def restore_threshold(registry: Registry, version: str, *, actor: Actor) -> bool:
    """Forget the site's threshold for ``version`` (the card's comes back); True when there was one.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is changed).
        ModelFileError: the version's card cannot be read.
        OSError: the site file or the audit line cannot be written.
    """
    require(actor, ADMINISTRATOR, "restoring the model's own threshold for the site")
    card_threshold = registry.card(version).threshold  # what comes back
    restored = registry.site.restore_threshold(version)
    if restored:
        audit.record_event("threshold-restored", actor=actor, version=version, threshold=card_threshold)
    return restored


def save_prevalence(registry: Registry, prevalence: float | None, *, actor: Actor) -> None:
    """Save (None: clear) the site's pneumonia prevalence.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is saved).
        ValueError: a prevalence outside (0, 1).
        OSError: the site file or the audit line cannot be written.
    """
    require(actor, ADMINISTRATOR, "saving the site's prevalence")
    registry.site.set_prevalence(prevalence)
    audit.record_event("prevalence-saved", actor=actor, prevalence=prevalence)
