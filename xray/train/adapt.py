"""Adapt a version to a site's acquisition without labels: ``python -m xray adapt DIR``.

From a folder of the site's unlabelled films (a week's worklist, say) it writes a new, inactive
version (activated like any other, through ``xray.govern.promotion``) whose network has:

- its BatchNorm statistics re-estimated on the site's films (AdaBN: Li, Wang, Shi, Liu and Hou,
  "Revisiting Batch Normalization For Practical Domain Adaptation", arXiv:1603.04779, 2016), the
  learned weights kept. Two changes to plain AdaBN, both from the measurements in docs/experiments.md
  (round 3): each film is weighted so the site's class mix counts as the training one (the site's
  prevalence by EM: Saerens, Latinne and Decaestecker, Neural Computation 2002,
  ``xray.decide.prevalence``), because plain AdaBN at a 20%-pneumonia site absorbed the prevalence as
  if it were acquisition (specificity 0.98 -> 0.72, films withheld 2.5 -> 175 of 392); and the site's
  statistics are mixed half and half with the parent's (Schneider et al., NeurIPS 2020), which kept
  the guard's withheld count nearest the parent's. No variant improved AUC on any drift we could
  build (perturbed sites, a whole unseen acquisition batch), so the gate keeps an adapted version out
  until labelled films have measured it;
- the site's prevalence estimate recorded in the card for the site to adopt (it moves the
  probabilities shown at a prevalence, never the decision).

Films the parent's guard withholds (outside the intended use, not a chest radiograph, unusual
features) are never used, so they cannot pull the statistics towards themselves. The guard itself is
kept: the parent's feature statistics and thresholds travel unchanged (AdaBN's premise is that the
site's films, normalised by their own statistics, look to the later layers like the training films),
and the card records how many of the site's films it withholds before and after. The calibration and
threshold are the parent's; nothing about sensitivity or specificity could be checked without labels,
and the card and the page say so (the card holds no validation figures: the gate refuses the version
until it is calibrated on labelled site films). Tent (entropy minimisation, Wang et al., ICLR 2021)
was not tried.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xray.decide import prevalence as P
from xray.govern import audit
from xray.govern.identity import ADMINISTRATOR, Actor, require
from xray.io.preprocess import ModelInput, try_read_model_input
from xray.model.registry import LoadedModel, Registry
from xray.serve.inference import model_inputs, predict
from xray.serve.pipeline import iter_image_paths

MIN_FILMS = 32  # fewer and the statistics of the first layers rest on too few films
PRIOR_CORRECTION = True  # weight films to the training class mix (docs/experiments.md, round 3)
SOURCE_WEIGHT = 0.5  # share of the parent's statistics kept (docs/experiments.md, round 3)
METHOD = ("AdaBN: every BatchNorm layer's running mean and variance re-estimated on the site's films "
          "that the parent's guard accepted (Li et al. 2016), each film weighted to the training class mix by the "
          "EM prevalence estimate, mixed half and half with the parent's statistics; learned weights, "
          "calibration, threshold, borderline band and guard unchanged")
NOT_CHECKED = ("No labels: sensitivity, specificity and calibration on this site's films were not measured, and "
               "the parent's validation figures do not apply to the adapted network, so the card holds none and the "
               "promotion gate refuses it until it is evaluated: calibrate it on labelled films of the site "
               "(python -m xray calibrate DIR --model VERSION), which measures it and "
               "gives a version the gate can judge.")


@dataclass
class Films:
    """A site's unlabelled folder as the parent sees it."""

    root: str
    paths: list[Path]  # readable films, in the folder's order
    prepared: list[ModelInput]  # what predict takes (pixels, shape, DICOM header fields)
    inputs: torch.Tensor  # (N, 1, S, S) uint8 model inputs
    withheld: np.ndarray  # (N,) bool: the parent's guard withheld the verdict (never used to adapt)
    p_before: np.ndarray  # (N,) the parent's calibrated p(pneumonia)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_films(model: LoadedModel, data_dir: str) -> Films:
    """Decode every image of a folder (any depth, labels ignored) and score it with the parent.

    Raises:
        ValueError: no such folder, or fewer than MIN_FILMS films the guard accepts (the message says).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    skipped: list[tuple[str, str]] = []
    paths, prepared, unreadable = [], [], []
    for path in iter_image_paths([str(root)], skipped):
        item, error = try_read_model_input(path, model.image_size)
        if item is None:
            unreadable.append((str(path.relative_to(root)), error))
        else:
            paths.append(path)
            prepared.append(item)
    predictions = predict(model, prepared, batch_size=64) if prepared else []
    withheld = np.array([pr.withheld for pr in predictions], dtype=bool)
    films = Films(str(root), paths, prepared, model_inputs(prepared, model.image_size) if prepared else
                  torch.zeros((0, 1, model.image_size, model.image_size), dtype=torch.uint8),
                  withheld, np.array([pr.p_pneumonia for pr in predictions]), unreadable, skipped)
    usable = int((~withheld).sum())
    if usable < MIN_FILMS:
        raise ValueError(
            f"{root} has {usable} films the guard accepts ({int(withheld.sum())} withheld, {len(unreadable)} "
            f"unreadable); adapting needs at least {MIN_FILMS}, or the normalisation statistics would rest on a "
            "handful of films")
    return films


MAX_FILMS = 1024  # the statistics come from one pass over at most this many films (a seeded sample)


def adabn(net: nn.Module, inputs: torch.Tensor, weights: np.ndarray | None = None,
          source_weight: float = 0.0) -> nn.Module:
    """A copy of ``net`` whose BatchNorm running statistics are those of ``inputs`` (N, 1, S, S) uint8,
    the rest of the net unchanged; returned in eval mode. Li et al. 2016 (AdaBN), Algorithm 1.

    Args:
        weights: (N,) non-negative weight of each film in the statistics (None: equal). Weighting each
            film by the ratio of the training to the site class priors (``prior_weights``) keeps a site's
            prevalence out of the statistics, which AdaBN alone would absorb as if it were acquisition.
        source_weight: in [0, 1), the share of the parent's own statistics in the mixture (Schneider et
            al., "Improving robustness against common corruptions by covariate shift adaptation",
            NeurIPS 2020); 0 = the site's alone.
    One forward pass over all films (at most MAX_FILMS, a seeded sample beyond): each layer's
    statistics are set from its whole input, every earlier layer already adapted, before it normalises.
    """
    adapted = copy.deepcopy(net).cpu().eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the network has no BatchNorm layer to adapt")
    if not 0.0 <= source_weight < 1.0:
        raise ValueError("source_weight must be in [0, 1)")
    w = np.ones(len(inputs)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(inputs) > MAX_FILMS:
        keep = np.sort(np.random.default_rng(0).choice(len(inputs), MAX_FILMS, replace=False))
        inputs, w = inputs[torch.from_numpy(keep)], w[keep]
    weight = torch.as_tensor(w / w.sum(), dtype=torch.float64)

    def set_statistics(module, args):  # the weighted mean and variance of this layer's input, per channel
        x = args[0].double()
        dims = [0] + list(range(2, x.dim()))
        share = weight.view((-1,) + (1,) * (x.dim() - 1)) / x[0, 0].numel()
        mean = (x * share).sum(dim=dims)
        var = (((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2) * share).sum(dim=dims)
        mu_s, var_s = module.running_mean.double(), module.running_var.double()
        a = source_weight
        mixed = a * mu_s + (1 - a) * mean
        module.running_var.copy_(a * (var_s + (mu_s - mixed) ** 2) + (1 - a) * (var + (mean - mixed) ** 2))
        module.running_mean.copy_(mixed)

    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    try:
        with torch.no_grad():
            adapted(inputs.float())
    finally:
        for hook in hooks:
            hook.remove()
    return adapted.eval()


def training_mix(card) -> float:
    """The share of pneumonia among the films the BatchNorm statistics were accumulated on: the card's
    training part (or the whole folder when it was not divided), else its calibration prevalence."""
    counts = card.data.counts
    part = counts.get("train") or counts.get("all")
    if part and part.get("PNEUMONIA", 0) + part.get("NORMAL", 0) > 0:
        return part.get("PNEUMONIA", 0) / (part.get("PNEUMONIA", 0) + part.get("NORMAL", 0))
    return card.calibration_prevalence


def prior_weights(p: np.ndarray, calibration_prevalence: float, site_prevalence: float,
                  target: float | None = None) -> np.ndarray:
    """(N,) weight of each film so the weighted site set has the class mix ``target`` (default the
    calibration prevalence; ``training_mix`` for BatchNorm): the expected ratio of the priors under the
    film's posterior at the site's prevalence (Saerens et al. 2002's adjustment of p, calibrated at
    ``calibration_prevalence``)."""
    target = calibration_prevalence if target is None else target
    q = P.adjust_to_prevalence(np.asarray(p, dtype=np.float64), calibration_prevalence, site_prevalence)
    return q * target / site_prevalence + (1 - q) * (1 - target) / (1 - site_prevalence)


def loaded_like(model: LoadedModel, net: nn.Module) -> LoadedModel:
    """``model`` with another network (same card, guard statistics, device): to score an adapted net."""
    return LoadedModel(net.to(model.device).eval(), model.card, model.device, model.ood_stats, model.outside_net)


@dataclass(frozen=True)
class Adaptation:
    """What adapting a version to a site's films gives, before anything is written."""

    parent: str
    net: nn.Module
    films: Films
    p_after: np.ndarray  # (N,) the adapted net's p(pneumonia) on every readable film
    withheld_after: np.ndarray  # (N,) bool: the kept guard on the adapted net's features
    prevalence_before: float  # EM estimates on the accepted films
    prevalence_after: float
    layers: int  # BatchNorm layers re-estimated

    def summary(self, threshold: float) -> dict:
        """JSON-able figures for the card, the page and the terminal (no labels: no accuracy)."""
        used = ~self.films.withheld
        before, after = self.films.p_before[used], self.p_after[used]
        return {"films": int(len(self.films.paths)), "used": int(used.sum()),
                "withheld_before": int(self.films.withheld.sum()), "withheld_after": int(self.withheld_after.sum()),
                "withheld_after_among_used": int((self.withheld_after & used).sum()),
                "unreadable": len(self.films.unreadable), "batchnorm_layers": self.layers,
                "called_pneumonia_before": float(np.mean(before >= threshold)),
                "called_pneumonia_after": float(np.mean(after >= threshold)),
                "mean_p_before": float(before.mean()), "mean_p_after": float(after.mean()),
                "decisions_changed": float(np.mean((before >= threshold) != (after >= threshold))),
                "prevalence_em_before": self.prevalence_before, "prevalence_em_after": self.prevalence_after}


def adapt_model(model: LoadedModel, films: Films, prior_correction: bool = PRIOR_CORRECTION,
                source_weight: float = SOURCE_WEIGHT) -> Adaptation:
    """AdaBN on the films the parent's guard accepted (weighted to the training class mix with
    ``prior_correction``, mixed with the parent's statistics by ``source_weight``), then score every film."""
    used = ~films.withheld
    prior = model.card.calibration_prevalence  # the prevalence the probabilities are calibrated at
    site_prevalence = P.estimate_prevalence(films.p_before[used], prior)
    weights = (prior_weights(films.p_before[used], prior, site_prevalence, training_mix(model.card))
               if prior_correction else None)
    net = adabn(model.net, films.inputs[torch.from_numpy(used)], weights, source_weight)
    adapted = loaded_like(model, net)
    predictions = predict(adapted, films.prepared, batch_size=64)
    p_after = np.array([pr.p_pneumonia for pr in predictions])
    withheld_after = np.array([pr.withheld for pr in predictions], dtype=bool)
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    return Adaptation(model.version, net, films, p_after, withheld_after,
                      site_prevalence, P.estimate_prevalence(p_after[used], prior),
                      layers)


def write_version(registry: Registry, model: LoadedModel, result: Adaptation, data_dir: str, *, actor: Actor) -> str:
    """Save the adapted net as a new inactive version: the parent's card, guard files, calibration,
    threshold and band, plus an ``adaptation`` block saying what changed, what was not checked and who
    adapted (also one ``site-adaptation`` audit line).

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is written).
    """
    require(actor, ADMINISTRATOR, "adapting a model to this site")
    parent_dir = registry.version_dir(model.version)
    extras = {name: (parent_dir / name).read_bytes() for name in model.card.extra_files}
    summary = result.summary(model.threshold)
    card = model.card.derived("adapted to a site's acquisition without labels (AdaBN)", {
        "validation": {"split": ("none: adapted without labels; the parent's validation figures are not this "
                                 "network's"), "n": 0},
        "adaptation": {"parent": model.version, "data_root": str(Path(data_dir).expanduser()),
                       "method": METHOD, **summary,
                       "prevalence_note": ("EM estimate (Saerens et al. 2002) on the films used; the site may adopt it "
                                           "as its prevalence (it changes the probabilities shown at a prevalence, "
                                           "never the decision)"),
                       "guard": ("kept: the parent's feature statistics and thresholds; films it withheld were not "
                                 "used to adapt"),
                       "not_checked": NOT_CHECKED, "by": actor.label, "subject": actor.subject},
    })
    version = registry.save_version(result.net, card, registry.new_version_id("adapt"), extras)
    audit.record_event("site-adaptation", actor=actor, version=version, parent=model.version,
                       films=summary["used"], prevalence_em=result.prevalence_before)
    return version


def adapt(registry: Registry, data_dir: str, version: str | None = None, *, actor: Actor) -> tuple[str, Adaptation]:
    """``python -m xray adapt``: read, adapt and write the new version; returns (id, result)."""
    require(actor, ADMINISTRATOR, "adapting a model to this site")
    model = registry.load(version, torch.device("cpu"))
    result = adapt_model(model, read_films(model, data_dir))
    return write_version(registry, model, result, data_dir, actor=actor), result


def terminal_summary(result: Adaptation, threshold: float) -> str:
    """A few lines for the terminal."""
    s = result.summary(threshold)
    return (f"site films: {s['films']} readable ({s['unreadable']} unreadable, skipped); {s['used']} used, "
            f"{s['withheld_before']} withheld by the guard and not used\n"
            f"changed: the running statistics of {s['batchnorm_layers']} BatchNorm layers (AdaBN); weights, "
            "calibration, threshold and guard kept\n"
            f"called pneumonia at the threshold {threshold:.6f}: {s['called_pneumonia_before']:.1%} before, "
            f"{s['called_pneumonia_after']:.1%} after ({s['decisions_changed']:.1%} of decisions changed); "
            f"mean p {s['mean_p_before']:.3f} -> {s['mean_p_after']:.3f}\n"
            f"withheld by the guard: {s['withheld_before']} before, {s['withheld_after']} after\n"
            f"site prevalence (EM): {s['prevalence_em_before']:.3f} before, {s['prevalence_em_after']:.3f} after\n"
            f"not checked: {NOT_CHECKED}")
