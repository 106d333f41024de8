"""Calibrate a version to a site: refit its probability calibration and operating threshold on a small
local labelled folder, without retraining, as a new inactive version with byte-identical weights.
And the site's prevalence: Bayes' rule on the odds, and the EM estimate of an unknown prior.

Recalibration on a modest local sample is the cheapest remedy for the threshold and probability
shifts a model shows at a new hospital (see e.g. Van Calster et al., "Calibration: the Achilles heel
of predictive analytics", BMC Medicine 2019). Figures on the local set are cross-validated: each fold
is scored with a calibration and threshold fitted on the other folds. The folder must hold what the
promotion gate requires of an acceptance set (``promotion.large_enough``: 200 images, 50 of each class);
even then the 95% intervals are wide (a sensitivity from 60 pneumonia images has an interval about
+-0.06 wide at 0.95): the card and the page say so. Writing the calibrated version is an administrator's
(``identity.require``); its card and an audit line (``site-calibration``) name who did it.

A sensitivity floor is fitted with a margin for that sampling error (``site_rule``): the threshold
keeps enough local pneumonia images that the one-sided 95% Clopper-Pearson lower bound of sensitivity
reaches the floor (``metrics.choose_threshold``'s ``lcb-`` rules), so new films like the local ones
keep it with 95% confidence; too few images for that promise and nothing is fitted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xray.decide import calibration as C
from xray.decide import metrics as M
from xray.govern import audit, promotion
from xray.govern.identity import ADMINISTRATOR, Actor, require
from xray.io.folders import CLASSES, decoded_dataset, scan_dataset
from xray.serve.inference import logits_of
from xray.model.registry import LoadedModel, Registry

FOLDS = 5
METHOD = "Platt scaling refitted on the site's labelled images (network weights unchanged)"
NO_PROMISE = ("no promise on new films: the threshold rests on the local images' point estimate, "
              "which a new set of films misses about half the time")


def site_rule(rule: str) -> str:
    """The rule a site calibration fits for a version's rule: a sensitivity or specificity floor becomes
    its ``lcb-`` form (the floor kept with 95% confidence on new films); other rules are unchanged."""
    for prefix, confident in (("min-sensitivity>=", "lcb-sensitivity>="), ("sensitivity>=", "lcb-sensitivity>="),
                              ("specificity>=", "lcb-specificity>=")):
        if rule.startswith(prefix):
            return confident + rule[len(prefix):]
    return rule


def promise(guarantee: dict | None) -> str:
    """The guarantee of a site calibration in words (the page, the card and the terminal say the same)."""
    if guarantee is None:
        return NO_PROMISE
    what = "pneumonia" if guarantee["metric"] == "sensitivity" else "normal"
    return (f"{guarantee['metric']} at least {guarantee['floor']:g} on new films like the local ones, with "
            f"{guarantee['confidence']:.0%} confidence ({guarantee['k']} of {guarantee['n']} local {what} images "
            f"on the right side of the threshold; {guarantee['method']}: {guarantee['lower_bound']:.3f})")


# -- recalibration ----------------------------------------------------------------------------------------
@dataclass
class SiteData:
    """A labelled local folder, scored by a version: raw logits and labels of every readable image."""

    root: str
    fingerprint: str
    logits: np.ndarray  # (N,) raw network logits
    labels: np.ndarray  # (N,) 0/1
    counts: dict[str, int]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def score_folder(model: LoadedModel, data_dir: str, workers: int = 0) -> SiteData:
    """Decode and score every image of a labelled folder (any depth, NORMAL/ and PNEUMONIA/).

    Raises:
        ValueError: the folder cannot be read, is too small or lacks a class (the message says the minimum).
    """
    scan = scan_dataset(data_dir)
    listed = {name: sum(s.label == i for s in scan.samples) for i, name in enumerate(CLASSES)}
    if not promotion.large_enough(listed["PNEUMONIA"], listed["NORMAL"]):  # before any decoding
        raise ValueError(
            f"{scan.root} holds {listed['NORMAL']} normal and {listed['PNEUMONIA']} pneumonia images; recalibration "
            f"needs at least {promotion.MIN_ACCEPTANCE_IMAGES} with {promotion.MIN_PER_CLASS} of each class, what "
            "the promotion gate requires of the set a version is accepted on")
    images, errors = decoded_dataset(scan, model.image_size, workers)
    ok = np.array([not e for e in errors], dtype=bool)
    unreadable = [(scan.relative(s.path), e) for s, e in zip(scan.samples, errors) if e]
    labels = np.array([s.label for s in scan.samples], dtype=np.int64)[ok]
    counts = {name: int((labels == i).sum()) for i, name in enumerate(CLASSES)}
    if not promotion.large_enough(counts["PNEUMONIA"], counts["NORMAL"]):
        raise ValueError(
            f"{scan.root} has {counts['NORMAL']} readable normal and {counts['PNEUMONIA']} readable pneumonia "
            f"images ({len(unreadable)} unreadable); recalibration needs at least {promotion.MIN_ACCEPTANCE_IMAGES} "
            f"with {promotion.MIN_PER_CLASS} of each class, what the promotion gate requires of the set a version "
            "is accepted on")
    inputs = torch.from_numpy(images[ok]).unsqueeze(1)
    logits = np.concatenate([logits_of(model, inputs[i:i + 256]).double().numpy() for i in range(0, len(inputs), 256)])
    return SiteData(str(scan.root), scan.fingerprint(), logits, labels, counts, unreadable, scan.skipped)


def _figures(labels: np.ndarray, p: np.ndarray, called: np.ndarray) -> dict:
    """Sensitivity, specificity (with n and Wilson 95% intervals) of the calls ``called`` (N,) bool, and
    ROC AUC and ECE (10 bins) of the probabilities ``p``."""
    sensitivity, specificity = M.sensitivity_specificity(labels, called)
    return {"n": int(len(labels)),
            "sensitivity": sensitivity.value, "sensitivity_ci": [sensitivity.low, sensitivity.high],
            "specificity": specificity.value, "specificity_ci": [specificity.low, specificity.high],
            "roc_auc": M.roc_auc(labels, p), "ece": M.expected_calibration_error(labels, p)}


def crossfit_decisions(data: SiteData, rule: str, folds: int = FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted (p, called PNEUMONIA): each fold scored by a calibration and threshold fitted on the others."""
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(data.labels), dtype=int)
    for label in (0, 1):  # stratified: every fold has both classes
        index = np.nonzero(data.labels == label)[0]
        fold_of[rng.permutation(index)] = np.arange(len(index)) % folds
    p = np.zeros(len(data.labels))
    called = np.zeros(len(data.labels), dtype=bool)
    for k in range(folds):
        fit, held = fold_of != k, fold_of == k
        scale, bias = C.fit_platt(data.logits[fit], data.labels[fit])
        threshold = M.choose_threshold(data.labels[fit], C.apply(data.logits[fit], scale, bias), rule)
        p[held] = C.apply(data.logits[held], scale, bias)
        called[held] = p[held] >= threshold
    return p, called


@dataclass(frozen=True)
class Recalibration:
    """What recalibrating a version on a site's folder gives, before anything is written."""

    parent: str
    rule: str
    scale: float
    bias: float
    threshold: float
    before: dict  # the parent's calibration and threshold on the local images (in-sample: nothing was fitted)
    after: dict  # figures of the new threshold on the cross-fitted probabilities: what the new card records
    data: SiteData
    guarantee: dict | None = None  # metrics.guarantee_at: what the threshold promises on new films, or None
    p_crossfit: np.ndarray | None = None  # (N,) each image's probability from the calibration fitted without its fold


def recalibrate(model: LoadedModel, data: SiteData, rule: str | None = None) -> Recalibration:
    """Fit the new calibration and threshold on all local images; figures before and (cross-validated) after.

    ``rule`` defaults to ``site_rule`` of the version's rule. Raises:
        metrics.TooFewCases: an ``lcb-`` rule's promise needs more images than the folder has (the message
            says how many, and the rule without a promise that would fit).
    """
    rule = rule or site_rule(model.card.threshold_rule)
    if not M.is_threshold_rule(rule):
        raise ValueError(f"unknown threshold rule {rule!r}")
    if rule.startswith(("lcb-sensitivity>=", "lcb-specificity>=")):
        floor = float(rule.split(">=")[1])
        needed = M.minimum_for_bound(floor)
        cases = data.counts["PNEUMONIA" if rule.startswith("lcb-sensitivity") else "NORMAL"]
        if cases * (FOLDS - 1) // FOLDS < needed:
            what = "pneumonia" if rule.startswith("lcb-sensitivity") else "normal"
            raise M.TooFewCases(
                f"the rule {rule} promises its floor on new films with {M.CONFIDENCE:.0%} confidence, which needs "
                f"at least {needed} {what} images to fit and {-(-needed * FOLDS // (FOLDS - 1))} to cross-validate; "
                f"the folder has {cases}. Add labelled images, or choose a lower floor or a rule without a "
                f"promise ({rule.removeprefix('lcb-')})")
    p_before = C.apply(data.logits, *model.calibration)
    before = {**_figures(data.labels, p_before, p_before >= model.threshold), "threshold": model.threshold}
    scale, bias = C.fit_platt(data.logits, data.labels)
    threshold = M.choose_threshold(data.labels, C.apply(data.logits, scale, bias), rule)
    # One set of figures: the new threshold on cross-fitted probabilities (each image scored by a calibration
    # fitted without its fold). The new card stores these probabilities as its validation predictions, so
    # the preview, the card and the promotion gate all read the same sensitivity and specificity.
    p, _ = crossfit_decisions(data, rule)
    after = {**_figures(data.labels, p, p >= threshold), "threshold": float(threshold),
             "method": f"{FOLDS}-fold cross-fitted calibration, at the new threshold"}
    guarantee = M.guarantee_at(data.labels, C.apply(data.logits, scale, bias), threshold, rule)
    return Recalibration(model.version, rule, scale, bias, float(threshold), before, after, data, guarantee, p)


def write_version(registry: Registry, model: LoadedModel, result: Recalibration, *, actor: Actor) -> str:
    """Save ``result`` as a new inactive version: the parent's weights byte for byte, its OOD statistics,
    and a card that records the parent, the site data, the old and new calibration and threshold, and who
    calibrated (also one ``site-calibration`` audit line).

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is written).
        OSError: the version or the audit line cannot be written.
    """
    require(actor, ADMINISTRATOR, "calibrating a model to this site")
    old_scale, old_bias = model.calibration
    data = result.data
    # the cross-fitted probabilities (``recalibrate``): the card's figures are the preview's
    p_local = result.p_crossfit if result.p_crossfit is not None else C.apply(data.logits, result.scale, result.bias)
    band = model.card.borderline
    card = model.card.derived("calibrated to a site (same weights)", {
        "threshold": result.threshold,
        "threshold_rule": f"{result.rule} on the site's images",
        "calibration": {"method": METHOD, "scale": result.scale, "bias": result.bias,
                        "ece_crossfit": result.after["ece"]},
        "validation": {"split": f"the site's labelled images ({data.root}), {FOLDS}-fold cross-fitted",
                       **{k: v for k, v in M.metrics_at(data.labels, p_local, result.threshold).items()},
                       "ece": M.expected_calibration_error(data.labels, p_local),
                       "predictions": {"p_pneumonia": [round(float(v), 6) for v in p_local],
                                       "label": [int(v) for v in data.labels]}},
        "site_calibration": {
            "parent": model.version, "data_root": data.root, "data_fingerprint": data.fingerprint,
            "counts": data.counts, "unreadable": len(data.unreadable), "rule": result.rule,
            "by": actor.label, "subject": actor.subject,
            "old": {"threshold": model.threshold, "scale": old_scale, "bias": old_bias},
            "new": {"threshold": result.threshold, "scale": result.scale, "bias": result.bias},
            "before_on_site": result.before, "after_on_site_crossvalidated": result.after,
            "guarantee": result.guarantee, "promise": promise(result.guarantee),
            "note": ("figures on the site's images; with a few hundred images their 95% intervals are wide "
                     "(see the _ci fields)"),
        },
    })
    if band is not None and old_scale > 0:
        # the band is in calibrated log-odds: it scales with the calibration's slope
        ratio = result.scale / old_scale
        card["borderline"] = {**model.card.borderline_info, "below": round(band[0] * ratio, 4),
                              "above": round(band[1] * ratio, 4),
                              "method": model.card.borderline_info.get("method", "") + "; rescaled to the site calibration"}
    version = registry.save_derived_version(model.version, card, "site")
    audit.record_event("site-calibration", actor=actor, version=version, parent=model.version,
                       data_fingerprint=data.fingerprint, threshold=result.threshold, rule=result.rule)
    return version


def calibrate(registry: Registry, data_dir: str, version: str | None = None, rule: str | None = None,
              workers: int = 0, *, actor: Actor) -> tuple[str, Recalibration]:
    """``python -m xray calibrate``: score, recalibrate and write the new version; returns (id, result).

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (checked before any image is scored).
    """
    require(actor, ADMINISTRATOR, "calibrating a model to this site")
    model = registry.load(version, torch.device("cpu"))
    data = score_folder(model, data_dir, workers)
    result = recalibrate(model, data, rule)
    return write_version(registry, model, result, actor=actor), result


def terminal_summary(result: Recalibration) -> str:
    """A few lines for the terminal: the site's images, the figures before and after."""
    b, a = result.before, result.after

    def fig(d, key):
        low, high = d[f"{key}_ci"]
        return f"{d[key]:.3f} ({low:.3f}-{high:.3f})"

    counts = result.data.counts
    return (f"site images: {counts['NORMAL']} normal, {counts['PNEUMONIA']} pneumonia"
            f" ({len(result.data.unreadable)} unreadable, skipped)\n"
            f"before (version {result.parent}, threshold {b['threshold']:.6f}): sensitivity {fig(b, 'sensitivity')}, "
            f"specificity {fig(b, 'specificity')}, ECE {b['ece']:.3f}\n"
            f"after (new threshold {result.threshold:.6f}, rule {result.rule}; {FOLDS}-fold cross-validated): "
            f"sensitivity {fig(a, 'sensitivity')}, specificity {fig(a, 'specificity')}, ECE {a['ece']:.3f}\n"
            "95% intervals in brackets: with this many images they are wide.\n"
            f"promise: {promise(result.guarantee)}")

