"""The model card: a typed, validated contract that travels with each version's weights.

A card is JSON on disk (``versions/ID/card.json``). ``ModelCard.from_dict`` checks it once, when a
version is read, and exposes typed attributes (``card.threshold``, ``card.validation.sensitivity``,
``card.data.fingerprint``); pages and the engine read those, never ``.get`` chains. The card stays a
read-only ``Mapping`` of its JSON too, so tools and old scripts that index it keep working, and every
key on disk survives a round trip (``to_dict``). ``build`` is the one place a new card is made.

Old cards keep loading: a card without ``stem`` builds the conv-stem network, a calibration block
holding a ``temperature`` T means Platt (1/T, 0), and a card without validation predictions simply
has ``validation.labels is None``.

Shape follows torchxrayvision's weights-with-thresholds (``op_threshs``) and Mitchell et al.,
"Model Cards for Model Reporting", FAT* 2019 (intended use, limits, evaluation data and figures).
"""
from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from xray.clock import utc_now
from xray.decide import metrics as M
from xray.decide.calibration import parameters as calibration_parameters
from xray.model.net import ModelConfig

# The intended use of versions whose card does not state it (all shipped so far): the training data's.
DEFAULT_SPEC = {"age_years": [1, 5], "views": ["AP", "PA"], "modalities": ["CR", "DX"], "body_parts": ["CHEST"]}

# Keys written by the registry from the files themselves: no card update may change them.
PROTECTED_KEYS = frozenset({"version", "weights_sha256", "weights_bytes", "extra_files"})

INTENDED_USE = ("Decision support for pediatric (ages 1-5) anterior-posterior chest radiographs: "
                "estimates the probability of pneumonia and shows where the model looked. It assists "
                "a clinician and does not diagnose.")
LIMITS = (
    "Trained on one hospital's pediatric AP radiographs (Guangzhou, Kermany et al. 2018); adults, "
    "lateral views, other hospitals' equipment and other diseases are outside its training data.",
    "Validation figures come from a patient-level split of the training images and flatter: expect "
    "lower specificity on new data.",
    "Does not distinguish bacterial from viral pneumonia, nor detect other findings.",
)
NOT_STATED = "Not stated in this model's card."


class CardError(ValueError):
    """A card that is not a valid model card (missing or ill-typed field)."""


def _number(value: Any, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CardError(f"{what} must be a number, not {value!r}") from None
    if not (low <= number <= high):
        raise CardError(f"{what} must lie in [{low}, {high}], not {number}")
    return number


def _optional_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


class _Figures:
    """Typed access to a block of ``metrics.metrics_at`` figures (``self.figures``)."""

    figures: Mapping[str, Any]

    def figure(self, key: str) -> float | None:
        """A figure by its metrics name (``roc_auc``, ``sensitivity``, ...); None when absent or NaN."""
        value = _optional_float(self.figures.get(key))
        return None if value is None or math.isnan(value) else value

    @property
    def sensitivity(self) -> float | None:
        return self.figure("sensitivity")

    @property
    def specificity(self) -> float | None:
        return self.figure("specificity")

    @property
    def roc_auc(self) -> float | None:
        return self.figure("roc_auc")


@dataclass(frozen=True)
class Validation(_Figures):
    """Figures on the version's validation set at the card's threshold, and the stored predictions."""

    description: str  # how validation was formed, in words (the card's "split")
    n: int  # images the figures rest on (0 when not recorded)
    figures: Mapping[str, Any]  # metrics.metrics_at(...) keys + ece, at ``threshold``
    threshold: float | None  # the threshold the figures were computed at
    labels: tuple[int, ...] | None = None  # (n,) 0/1 ground truth, None when the card holds none
    scores: tuple[float, ...] | None = None  # (n,) calibrated p(pneumonia)

    @property
    def confusion_matrix(self) -> Mapping[str, int] | None:
        cm = self.figures.get("confusion_matrix")
        return cm if isinstance(cm, Mapping) and {"tp", "fp", "tn", "fn"} <= set(cm) else None

    @classmethod
    def from_dict(cls, block: Any) -> "Validation":
        block = block if isinstance(block, Mapping) else {}
        stored = block.get("predictions") if isinstance(block.get("predictions"), Mapping) else {}
        labels, scores = stored.get("label"), stored.get("p_pneumonia")
        if not labels or not scores or len(labels) != len(scores):
            labels = scores = None
        else:
            try:
                labels = tuple(int(v) for v in labels)
                scores = tuple(float(v) for v in scores)
            except (TypeError, ValueError):
                raise CardError("validation predictions must be numbers") from None
            if set(labels) - {0, 1}:
                raise CardError("validation labels must be 0 or 1")
        n = block.get("n", len(labels) if labels else 0)
        figures = {k: v for k, v in block.items() if k not in ("predictions", "split", "n")}
        return cls(description=str(block.get("split", "")), n=int(n or 0), figures=figures,
                   threshold=_optional_float(block.get("threshold")), labels=labels, scores=scores)


@dataclass(frozen=True)
class OperatingFigures:
    """Sensitivity and specificity at one threshold, with where they come from: on the validation films
    (n and Wilson 95% intervals) and under the worst of the acquisition perturbations the card stores
    (``validation.calibration_set``: the same films under gamma, contrast, blur, noise, crop, zoom,
    rotation), which one it was. What a screen shows beside a threshold (``describe``)."""

    threshold: float
    source: str  # how the validation films were chosen (the card's split), in words
    positives: int
    negatives: int
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple[float, float]
    specificity_ci: tuple[float, float]
    worst_sensitivity: tuple[float, str] | None = None  # (figure, perturbation); None: the card stores none
    worst_specificity: tuple[float, str] | None = None

    def describe(self, short: bool = False) -> str:
        """In words, e.g. 'validation on 583 pneumonia / 202 normal films (the training hospital's): sensitivity
        0.967 (0.950-0.979), ...; the same films under the worst acquisition perturbation: sensitivity 0.950
        (gamma 1.4), ...'."""
        if short:
            worst = ("" if self.worst_sensitivity is None else
                     f"; worst perturbation {self.worst_sensitivity[0]:.2f} / {self.worst_specificity[0]:.2f}")
            return f"sens {self.sensitivity:.2f} / spec {self.specificity:.2f} on validation{worst}"
        where = "this site's labelled" if self.source.startswith("the site's") else "the training hospital's"
        text = (f"validation on {self.positives} pneumonia / {self.negatives} normal films ({where}): "
                f"sensitivity {self.sensitivity:.3f} ({self.sensitivity_ci[0]:.3f}-{self.sensitivity_ci[1]:.3f}), "
                f"specificity {self.specificity:.3f} ({self.specificity_ci[0]:.3f}-{self.specificity_ci[1]:.3f})")
        if self.worst_sensitivity is None:
            return text + "; no perturbed copy stored, so no figure under changed acquisition"
        return (text + f"; the same films under the worst acquisition perturbation: sensitivity "
                f"{self.worst_sensitivity[0]:.3f} ({self.worst_sensitivity[1]}), specificity "
                f"{self.worst_specificity[0]:.3f} ({self.worst_specificity[1]})")


def _perturbed_sets(validation: Validation) -> dict[str, tuple[list[int], list[float]]]:
    """The card's calibration set split by condition: perturbation name -> (labels, p); {} when absent."""
    block = validation.figures.get("calibration_set")
    if not isinstance(block, Mapping) or "under each of " not in str(block.get("images", "")):
        return {}
    names = str(block["images"]).split("under each of ", 1)[1].split(", ")
    labels, scores = list(block.get("label") or []), list(block.get("p_pneumonia") or [])
    n = len(labels) // (len(names) + 1) if labels else 0
    if not n or len(scores) != len(labels) or n * (len(names) + 1) != len(labels):
        return {}
    return {name: (labels[(k + 1) * n:(k + 2) * n], scores[(k + 1) * n:(k + 2) * n]) for k, name in enumerate(names)}


def operating_figures(validation: Validation, threshold: float) -> OperatingFigures | None:
    """``OperatingFigures`` at ``threshold`` from a card's validation block; None when it stores no predictions."""
    if validation.labels is None or validation.scores is None:
        return None
    m = M.metrics_at(validation.labels, validation.scores, threshold)
    cm = m["confusion_matrix"]
    positives, negatives = cm["tp"] + cm["fn"], cm["tn"] + cm["fp"]
    worst_sens = worst_spec = None
    for name, (labels, scores) in _perturbed_sets(validation).items():
        q = M.metrics_at(labels, scores, threshold)
        if worst_sens is None or q["sensitivity"] < worst_sens[0]:
            worst_sens = (q["sensitivity"], name)
        if worst_spec is None or q["specificity"] < worst_spec[0]:
            worst_spec = (q["specificity"], name)
    return OperatingFigures(threshold, validation.description, positives, negatives, m["sensitivity"], m["specificity"],
                            M.wilson_interval(cm["tp"], positives), M.wilson_interval(cm["tn"], negatives),
                            worst_sens, worst_spec)


@dataclass(frozen=True)
class DataRecord:
    """What the version was trained on (never the images: counts and a fingerprint)."""

    root: str = ""
    fingerprint: str = ""
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # part -> class -> images
    train_images: int | None = None
    val_images: int | None = None
    duplicates: int = 0
    unreadable: int = 0

    @classmethod
    def from_dict(cls, block: Any) -> "DataRecord":
        block = block if isinstance(block, Mapping) else {}
        counts = block.get("counts") if isinstance(block.get("counts"), Mapping) else {}
        return cls(root=str(block.get("root", "")), fingerprint=str(block.get("fingerprint", "")), counts=counts,
                   train_images=block.get("train_images"), val_images=block.get("val_images"),
                   duplicates=int(block.get("duplicates", 0) or 0), unreadable=int(block.get("unreadable", 0) or 0))


@dataclass(frozen=True)
class HeldOutFigures(_Figures):
    """Figures on the training folder's ``test/`` part at the card's threshold: reported, never chosen on."""

    note: str = ""
    n: int = 0
    figures: Mapping[str, Any] = field(default_factory=dict)  # metrics.metrics_at(...) keys + ece

    @classmethod
    def from_dict(cls, block: Any) -> "HeldOutFigures | None":
        if not isinstance(block, Mapping):
            return None
        return cls(note=str(block.get("note", "")), n=int(block.get("n", 0) or 0),
                   figures={k: v for k, v in block.items() if k not in ("note", "n")})


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and the Platt calibration (scale, bias) it applies to."""

    threshold: float | None = None
    scale: float | None = None
    bias: float | None = None

    @classmethod
    def from_dict(cls, block: Any) -> "OperatingPoint":
        block = block if isinstance(block, Mapping) else {}
        return cls(*(_optional_float(block.get(k)) for k in ("threshold", "scale", "bias")))


@dataclass(frozen=True)
class SiteCalibration:
    """How a version calibrated to a site was made (``xray.govern.sitecal``): its parent, the site's data,
    the old and new operating points and the figures on the site's images before and after."""

    parent: str = ""
    data_root: str = ""
    data_fingerprint: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)  # class -> readable site images
    unreadable: int = 0
    rule: str = ""
    old: OperatingPoint = OperatingPoint()
    new: OperatingPoint = OperatingPoint()
    before: Mapping[str, Any] = field(default_factory=dict)  # on the site's images, the parent's calibration
    after: Mapping[str, Any] = field(default_factory=dict)  # the same, cross-validated with the new one
    note: str = ""
    guarantee: Mapping[str, Any] | None = None  # metrics.guarantee_at: what the threshold promises on new films
    promise: str = ""  # that promise in words (sitecal.promise), or that there is none

    @property
    def images(self) -> int:
        """Readable labelled site images the calibration was fitted on."""
        return sum(int(v) for v in self.counts.values())

    @classmethod
    def from_dict(cls, block: Any) -> "SiteCalibration | None":
        if not isinstance(block, Mapping):
            return None
        counts = block.get("counts") if isinstance(block.get("counts"), Mapping) else {}
        before, after = block.get("before_on_site"), block.get("after_on_site_crossvalidated")
        return cls(parent=str(block.get("parent", "") or ""), data_root=str(block.get("data_root", "") or ""),
                   data_fingerprint=str(block.get("data_fingerprint", "") or ""), counts=counts,
                   unreadable=int(block.get("unreadable", 0) or 0), rule=str(block.get("rule", "") or ""),
                   old=OperatingPoint.from_dict(block.get("old")), new=OperatingPoint.from_dict(block.get("new")),
                   before=before if isinstance(before, Mapping) else {},
                   after=after if isinstance(after, Mapping) else {}, note=str(block.get("note", "") or ""),
                   guarantee=block.get("guarantee") if isinstance(block.get("guarantee"), Mapping) else None,
                   promise=str(block.get("promise", "") or ""))


@dataclass(frozen=True)
class ActivationOverride:
    """One activation past the promotion gate: who, when (UTC), the typed reason and the gate's reasons."""

    by: str  # the signed-in user's e-mail (or name), the OS login on the command line
    at: str
    reason: str
    gate: tuple[str, ...] = ()
    subject: str = ""  # the identity provider's subject of ``by`` ("" for the OS login and older cards)

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "at": self.at, "reason": self.reason, "gate": list(self.gate),
                **({"subject": self.subject} if self.subject else {})}

    @classmethod
    def all_from(cls, blocks: Any) -> tuple["ActivationOverride", ...]:
        """The card's ``activation_overrides`` list (absent: none)."""
        if not isinstance(blocks, (list, tuple)) and blocks:
            raise CardError("activation_overrides must be a list")
        return tuple(cls.from_dict(block) for block in blocks or ())

    @classmethod
    def from_dict(cls, block: Any) -> "ActivationOverride":
        if not isinstance(block, Mapping):
            raise CardError("an activation override must be a JSON object")
        gate = block.get("gate") or ()
        return cls(by=str(block.get("by", "") or ""), at=str(block.get("at", "") or ""),
                   reason=str(block.get("reason", "") or ""),
                   gate=(str(gate),) if isinstance(gate, str) else tuple(str(g) for g in gate),
                   subject=str(block.get("subject", "") or ""))


@dataclass(frozen=True)
class TrainingRecord:
    """How the version was trained: its full config, the command that reproduces it, the history."""

    config: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict()
    command: str = ""
    seconds: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    parent: str | None = None  # the version it was fine-tuned from
    history: tuple = ()

    @property
    def recipe(self) -> str:
        """The training command without where this machine kept its files (--run-dir, --registry,
        --events) and with DATA_DIR for its data folder: the recipe, for people (the card keeps the
        full command)."""
        try:
            words = shlex.split(self.command)
        except ValueError:
            return self.command
        kept, skip = [], False
        for word in words:
            if skip:
                skip = False
            elif word in ("--run-dir", "--registry", "--events"):
                skip = True
            else:
                kept.append(word)
        if len(kept) > 4 and kept[:4] == ["python", "-m", "xray", "train"]:
            kept[4] = "DATA_DIR"
        return shlex.join(kept)

    @classmethod
    def from_dict(cls, block: Any) -> "TrainingRecord":
        block = block if isinstance(block, Mapping) else {}
        config = block.get("config") if isinstance(block.get("config"), Mapping) else {}
        return cls(config=config, command=str(block.get("command", "")), seconds=_optional_float(block.get("seconds")),
                   best_epoch=block.get("best_epoch"), epochs_run=block.get("epochs_run"), parent=block.get("parent"),
                   history=tuple(block.get("history") or ()))


class ModelCard(Mapping):
    """A validated model card: typed attributes (every block parsed once, here), and a read-only mapping of
    the JSON it came from.

    Raises (from ``from_dict``):
        CardError: a required field (version, threshold in [0, 1], architecture config, image size)
            is missing or ill-typed.
    """

    def __init__(self, raw: Mapping[str, Any]):
        if not isinstance(raw, Mapping):
            raise CardError("a model card must be a JSON object")
        self._raw = dict(raw)
        try:
            self.version: str = str(raw["version"])
            architecture = raw["architecture"]
            self.config: ModelConfig = ModelConfig.from_dict(dict(architecture["config"]))
            preprocessing = raw["preprocessing"]
            self.image_size: int = int(preprocessing["image_size"])
        except (KeyError, TypeError) as exc:
            raise CardError(f"model card lacks {exc}") from None
        except ValueError as exc:
            raise CardError(f"model card: {exc}") from None
        self.threshold: float = _number(raw.get("threshold"), "threshold", 0.0, 1.0)
        if self.image_size < 8:
            raise CardError(f"image size {self.image_size} is too small")
        self.architecture_name: str = str(architecture.get("name", "CNN"))
        self.parameters: int | None = architecture.get("parameters")
        self.macs: int | None = architecture.get("macs")
        self.gradcam_layer: str = str(architecture.get("gradcam_layer", "the last stage"))
        self.tta: str = str(preprocessing.get("tta", "none") or "none")
        self.normalisation: str = str(preprocessing.get("normalisation", self.config.normalisation))
        self.created: str = str(raw.get("created", ""))
        self.threshold_rule: str = str(raw.get("threshold_rule", "") or "not recorded")
        block = raw.get("calibration") if isinstance(raw.get("calibration"), Mapping) else {}
        self.calibration: tuple[float, float] = calibration_parameters(block)  # (scale, bias)
        self.calibration_method: str = str(block.get("method", "no calibration"))
        self.ece_crossfit: float | None = _optional_float(block.get("ece_crossfit"))
        self.validation: Validation = Validation.from_dict(raw.get("validation"))
        self.data: DataRecord = DataRecord.from_dict(raw.get("data"))
        self.training: TrainingRecord = TrainingRecord.from_dict(raw.get("training"))
        self.ood: Mapping[str, Any] = raw.get("ood") if isinstance(raw.get("ood"), Mapping) else {}
        self.intended_use: str = str(raw.get("intended_use") or NOT_STATED)
        self.limits: tuple[str, ...] = tuple(raw.get("limits") or ())
        self.experiment: str = str(raw.get("experiment", "") or "")
        block = raw.get("borderline") if isinstance(raw.get("borderline"), Mapping) else None
        self.borderline_info: Mapping[str, Any] | None = block
        self.borderline: tuple[float, float] | None = None  # (below, above) log-odds around the threshold
        if block is not None:
            below = _number(block.get("below"), "borderline below", 0.0, 20.0)
            above = _number(block.get("above"), "borderline above", 0.0, 20.0)
            self.borderline = (below, above)
        self.test: HeldOutFigures | None = HeldOutFigures.from_dict(raw.get("test"))
        self.derived_from: Mapping[str, Any] | None = raw.get("derived_from") if isinstance(raw.get("derived_from"), Mapping) else None
        self.site_calibration: SiteCalibration | None = SiteCalibration.from_dict(raw.get("site_calibration"))
        self.activation_overrides: tuple[ActivationOverride, ...] = ActivationOverride.all_from(
            raw.get("activation_overrides"))
        spec = raw.get("intended_use_spec")
        self.intended_use_spec: dict[str, Any] = {**DEFAULT_SPEC, **(spec if isinstance(spec, Mapping) else {})}
        self.weights_sha256: str = str(raw.get("weights_sha256", ""))
        extra = raw.get("extra_files") or {}
        if not isinstance(extra, Mapping):
            raise CardError("extra_files must map file names to SHA-256 digests")
        self.extra_files: Mapping[str, str] = extra

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ModelCard":
        return cls(raw)

    @property
    def calibration_prevalence(self) -> float:
        """The prevalence its probabilities are calibrated at: that of its calibration (validation) set."""
        if self.validation.labels:
            return sum(self.validation.labels) / len(self.validation.labels)
        counts = self.data.counts.get("all") or {}
        total = sum(counts.values())
        return counts.get("PNEUMONIA", 0) / total if total else 0.5

    # -- the Mapping view of the JSON ---------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"ModelCard(version={self.version!r}, threshold={self.threshold!r})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to write (a copy: the card itself never changes)."""
        return dict(self._raw)

    def derived(self, change: str, updates: Mapping[str, Any]) -> dict[str, Any]:
        """The card of a new version made from this one without training (same network weights): its
        JSON minus the registry's keys and the activation overrides (those were this version's), with
        ``created``, ``derived_from`` and ``updates``."""
        card = {k: v for k, v in self._raw.items() if k not in PROTECTED_KEYS and k != "activation_overrides"}
        card.setdefault("intended_use_spec", dict(DEFAULT_SPEC))
        return {**card, "created": utc_now(),
                "derived_from": {"version": self.version, "change": change}, **updates}

    def updated(self, updates: Mapping[str, Any]) -> "ModelCard":
        """A new card with ``updates`` merged in (validated); protected keys cannot change."""
        touched = PROTECTED_KEYS & set(updates)
        if touched:
            raise CardError(f"cannot change {sorted(touched)}")
        return ModelCard({**self._raw, **updates})


def build(*, config: ModelConfig, parameters: int, macs: int, image_size: int, tta: str, threshold: float,
          threshold_rule: str, calibration: Mapping[str, Any], validation: Mapping[str, Any],
          training: Mapping[str, Any], data: Mapping[str, Any], environment: Mapping[str, Any],
          ood: Mapping[str, Any], test: Mapping[str, Any] | None = None,
          borderline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card of a newly trained version (without the registry's keys: version, checksums).

    Args:
        config: the network's architecture.
        validation: ``{"split": str, **metrics at threshold, "predictions": {"p_pneumonia": [...], "label": [...]}}``.
        calibration: ``{"method", "scale", "bias", "ece_crossfit"}`` (xray.calibration).
    Returns:
        A JSON-ready dict; ``ModelCard.from_dict`` accepts it once the registry adds the version.
    """
    card = {
        "created": utc_now(),
        "architecture": {"name": "PneumoniaNet", "config": config.to_dict(), "parameters": int(parameters),
                         "macs": int(macs), "gradcam_layer": "the last residual stage"},
        "preprocessing": {"image_size": int(image_size), "tta": tta,
                          "steps": ["decode to one channel in [0, 1] (xray.io.loader.load_image)",
                                    f"squash-resize to {image_size}x{image_size}, bilinear, antialiased; uint8",
                                    f"per-image {config.normalisation} (inside the network: xray.io.preprocess.normalise)"],
                          "normalisation": config.normalisation},
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "calibration": dict(calibration),
        "validation": dict(validation),
        "training": dict(training),
        "data": dict(data),
        "environment": dict(environment),
        "ood": dict(ood),
        "intended_use": INTENDED_USE,
        "intended_use_spec": dict(DEFAULT_SPEC),
        "limits": list(LIMITS),
    }
    if test is not None:
        card["test"] = dict(test)
    if borderline is not None:
        card["borderline"] = dict(borderline)
    return card
