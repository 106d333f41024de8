"""Promotion gate: which version may become the live model, and the record of every activation.

A version may be activated only when its card shows it was evaluated on an acceptance set of at least
``MIN_ACCEPTANCE_IMAGES`` images with ``MIN_PER_CLASS`` of each class, and there it is not worse than
the active version beyond ``SENSITIVITY_MARGIN`` in sensitivity at its operating threshold nor beyond
``AUC_MARGIN`` in ROC AUC. Otherwise activation needs an explicit override with a typed reason, which
goes into the active marker, the version's card (when it is not a shipped, read-only one) and the audit
log. Every figure carries its n and 95% interval (Wilson for proportions, Hanley-McNeil for AUC).

The acceptance set is the card's validation set (a patient-level split of the training folder, or a
site's labelled folder for a calibrated version). Two versions validated on different images are
compared figure to figure, each on its own set: the gate says so when their data fingerprints differ.
Rolling back to the previously active version is not gated (it was live before). Activating and rolling
back are an administrator's (``identity.require``); the override and the audit line name the actor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xray.clock import utc_now
from xray.govern import audit
from xray.govern.identity import ADMINISTRATOR, Actor, require
from xray.decide import metrics as M
from xray.decide.metrics import Figure
from xray.model.card import ModelCard
from xray.model.registry import ReadOnlyVersion, Registry

# The one minimum of a labelled set a version is accepted on (this gate) or calibrated on (xray.govern.sitecal)
MIN_ACCEPTANCE_IMAGES = 200  # below this a sensitivity interval is wider than +-0.05 at 0.95
MIN_PER_CLASS = 50  # each class, so that specificity means something too
SENSITIVITY_MARGIN = 0.02  # at the operating threshold, below the active version's
AUC_MARGIN = 0.01


def acceptance_figures(card: ModelCard, threshold: float | None = None) -> dict[str, Figure]:
    """Sensitivity, specificity and ROC AUC of ``card`` on its acceptance set at ``threshold`` (the
    card's when None), each with n and interval; empty when the card holds no validation predictions."""
    validation = card.validation
    if validation.labels is None:
        return {}
    y = np.asarray(validation.labels)
    p = np.asarray(validation.scores)
    t = card.threshold if threshold is None else float(threshold)
    sensitivity, specificity = M.sensitivity_specificity(y, p >= t)
    positives, negatives = sensitivity.n, specificity.n
    auc = M.roc_auc(y, p) if positives and negatives else float("nan")
    return {"sensitivity": sensitivity, "specificity": specificity,
            "roc_auc": Figure(auc, positives + negatives, *M.auc_interval(auc, positives, negatives))}


def large_enough(pneumonia: int, normal: int) -> bool:
    """Whether a labelled set of ``pneumonia`` + ``normal`` images may accept a version (this gate) or
    calibrate one to a site: at least ``MIN_ACCEPTANCE_IMAGES`` with ``MIN_PER_CLASS`` of each class."""
    return pneumonia + normal >= MIN_ACCEPTANCE_IMAGES and min(pneumonia, normal) >= MIN_PER_CLASS


@dataclass(frozen=True)
class GateResult:
    """Whether ``version`` may be activated, why not, and the figures the decision rests on."""

    version: str
    passed: bool
    reasons: tuple[str, ...]
    figures: dict[str, Figure] = field(default_factory=dict)
    active_version: str | None = None
    active_figures: dict[str, Figure] = field(default_factory=dict)
    same_acceptance_set: bool = False

    def summary(self) -> str:
        if self.passed:
            return f"{self.version} passes the promotion gate"
        return f"{self.version} does not pass the promotion gate: " + "; ".join(self.reasons)


def check_promotion(candidate: ModelCard, active: ModelCard | None) -> GateResult:
    """The gate's verdict for ``candidate`` against the ``active`` version's card (None: no active model)."""
    figures = acceptance_figures(candidate)
    reasons = []
    if not figures:
        reasons.append("its card holds no evaluation on an acceptance set")
    else:
        n, pos, neg = figures["roc_auc"].n, figures["sensitivity"].n, figures["specificity"].n
        if not large_enough(pos, neg):
            reasons.append(f"it was evaluated on only {n} images ({pos} pneumonia, {neg} normal); the gate needs "
                           f"at least {MIN_ACCEPTANCE_IMAGES} with {MIN_PER_CLASS} of each class")
    active_figures: dict[str, Figure] = {}
    same = False
    if active is not None and active.version != candidate.version:
        active_figures = acceptance_figures(active)
        same = bool(candidate.data.fingerprint) and candidate.data.fingerprint == active.data.fingerprint
        if figures and active_figures:
            for key, margin, name in (("sensitivity", SENSITIVITY_MARGIN, "sensitivity at its threshold"),
                                      ("roc_auc", AUC_MARGIN, "ROC AUC")):
                new, old = figures[key].value, active_figures[key].value
                if not new >= old - margin:  # NaN fails too
                    reasons.append(f"its {name} {new:.3f} is more than {margin:.2f} below the active "
                                   f"version's {old:.3f}")
    return GateResult(candidate.version, not reasons, tuple(reasons), figures,
                      active.version if active is not None else None, active_figures, same)


class PromotionRefused(ValueError):
    """The version does not pass the gate and no override was given."""

    def __init__(self, result: GateResult):
        super().__init__(result.summary() + ". To activate it anyway, give an override with a reason.")
        self.result = result


def gate(registry: Registry, version: str) -> GateResult:
    """``check_promotion`` for ``version`` against the registry's active version."""
    active = registry.active_version()
    return check_promotion(registry.card(version), registry.card(active) if active else None)


def promote(registry: Registry, version: str, force: bool = False, reason: str = "", *,
            actor: Actor) -> GateResult:
    """Activate ``version`` if it passes the gate, or with ``force`` and a ``reason`` (recorded).

    Every activation writes one audit line (``activation``, or ``activation-override`` with the gate's
    reasons), naming the version that was live before and ``actor``.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is changed).
        PromotionRefused: it fails the gate and ``force`` is False.
        ValueError: ``force`` without a reason; or the version cannot be loaded.
    """
    require(actor, ADMINISTRATOR, f"activating model {version}")
    result = gate(registry, version)
    if not result.passed:
        if not force:
            raise PromotionRefused(result)
        if not reason.strip():
            raise ValueError("an override needs a reason")
    previous = registry.active_version()
    override = None
    if not result.passed:
        override = {"by": actor.label, "at": utc_now(), "reason": " ".join(reason.split()),
                    "gate": list(result.reasons), **({"subject": actor.subject} if not actor.local else {})}
    registry.activate(version, override=override)
    if override is not None:
        try:
            card = registry.card(version)
            registry.update_card(version, {"activation_overrides": [*(o.to_dict() for o in card.activation_overrides),
                                                                   override]})
        except ReadOnlyVersion:
            pass  # a shipped card stays as shipped; the marker and the audit log hold the override
        audit.record_event("activation-override", actor=actor, version=version, previous=previous,
                           reason=override["reason"], gate=override["gate"])
    else:
        audit.record_event("activation", actor=actor, version=version, previous=previous,
                           reason=" ".join(reason.split()), gate="passed")
    return result


def rollback(registry: Registry, reason: str = "", *, actor: Actor) -> str:
    """Re-activate the previously active version (not gated: it was live before); one audit line.

    Returns:
        The version now active.
    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is changed).
        ValueError: there is no earlier version to roll back to.
    """
    require(actor, ADMINISTRATOR, "rolling back the active model")
    previous = registry.active_version()
    version = registry.rollback()
    audit.record_event("rollback", actor=actor, version=version, previous=previous, reason=" ".join(reason.split()))
    return version
