"""The one inference function, ``predict``, used by the app, the CLI, evaluation and the bench.

``predict`` returns the calibrated score and the result of the safety checks for each image; it
decides nothing. The decision at a threshold is ``xray.decide.decision.decide(p, threshold)``, made by
whoever shows or records it, at the threshold in force there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from xray.decide import calibration as C
from xray.serve import guard
from xray.model import ood as O
from xray.decide.decision import decide
from xray.model.net import autocast_for, to_input, tta_logits
from xray.io.preprocess import ImageLike, ModelInput, model_input
from xray.model.registry import LoadedModel


@dataclass(frozen=True)
class Prediction:
    """One image's score and check results; no decision (see ``decision``)."""

    p_pneumonia: float  # calibrated probability of pneumonia, in [0, 1]
    model_version: str
    outcome: str = guard.VERDICT  # the intended-use guard's: VERDICT, OUTSIDE_INTENDED_USE or NOT_A_CHEST_RADIOGRAPH
    withheld_reason: str = ""  # one line saying why, when the verdict is withheld
    band: tuple[float, float] | None = None  # the version's borderline band (log-odds), ``ModelCard.borderline``

    @property
    def withheld(self) -> bool:
        """The guard withheld the verdict (header or image outside the intended use): show no decision."""
        return self.outcome != guard.VERDICT

    def decision(self, threshold: float) -> str | None:
        """PNEUMONIA / NORMAL / BORDERLINE at ``threshold`` (``xray.decide.decision.decide`` with the version's
        band), or None when the verdict was withheld."""
        return None if self.withheld else decide(self.p_pneumonia, threshold, self.band)


def model_inputs(images: "Sequence[ImageLike | ModelInput]", image_size: int) -> torch.Tensor:
    """Decoded images -> (B, 1, S, S) uint8 tensor, exactly as training sees them."""
    return torch.from_numpy(np.stack([model_input(im, image_size).pixels for im in images])).unsqueeze(1)


def logits_of(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) uint8 -> (B,) logits, with the card's test-time augmentation if any."""
    return logits_and_features(model, inputs)[0]


def logits_and_features(model: LoadedModel, inputs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(B, 1, S, S) uint8 -> (B,) logits (with the card's TTA) and the (B, F) features the OOD check
    measures (the last stage pooled on the grid of the version's OOD statistics), one pass."""
    return logits_and_guard_features(model, inputs)[:2]


def logits_and_guard_features(model: LoadedModel, inputs: torch.Tensor
                              ) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    """``logits_and_features`` plus the (B, F') features of the home-vs-outside score (the last stage on
    its grid; None when the version has no such score), from the same pass."""
    stats = getattr(model, "ood_stats", None)
    net = model.inference_net  # BatchNorm folded: model.net's outputs to float rounding
    x = to_input(inputs, model.device, net.config)  # (B, 1, S, S) grey levels
    outside = None
    with torch.inference_mode(), autocast_for(model.device):
        feature_map = net.feature_map(x)  # (B, C, h, w)
        logits = net.classify(net.pool(feature_map).flatten(1))  # identical to net(x)
        features = O.grid_features(feature_map, stats.grid if stats is not None else 1)
        if stats is not None and stats.outside is not None:
            outside = O.grid_features(feature_map, stats.outside_grid).double().cpu().numpy()
        logits = tta_logits(net, x, model.card.tta, logits)
    return logits.float().cpu(), features.double().cpu().numpy(), outside


def outside_net_scores(model: LoadedModel, inputs: torch.Tensor) -> np.ndarray | None:
    """(B, 1, S, S) uint8 model inputs -> (B,) the guard's home-vs-outside networks' score, or None when the
    version's guard does not use them (``xray.model.outside_net``)."""
    stats, ensemble = getattr(model, "ood_stats", None), getattr(model, "outside_net", None)
    if stats is None or stats.net_scale is None or ensemble is None:
        return None
    return ensemble.score(inputs)


def probabilities(model: LoadedModel, logits: torch.Tensor) -> np.ndarray:
    """(B,) raw logits -> (B,) calibrated p(pneumonia) (the card's calibration, ``xray.calibration``)."""
    return C.apply(logits, *model.calibration)


def predict(model: LoadedModel, images: "Sequence[ImageLike | ModelInput]", batch_size: int = 32) -> list[Prediction]:
    """Score decoded radiographs.

    Args:
        model: from ``Registry.load``.
        images: ``XrayImage`` objects, (H, W) float arrays in [0, 1] of any size, or ``ModelInput``.
        batch_size: images per forward pass.
    Returns:
        One ``Prediction`` per image, in order (score and checks; decide with ``Prediction.decision``).
    """
    stats = getattr(model, "ood_stats", None)
    spec = model.card.intended_use_spec
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch = [model_input(im, model.image_size) for im in images[start:start + batch_size]]
        inputs = model_inputs(batch, model.image_size)  # (B, 1, S, S) uint8
        logits, features, outside = logits_and_guard_features(model, inputs)
        distances = stats.distances(features) if stats is not None else [None] * len(batch)
        turned = stats.upside_down_scores(features) if stats is not None else [None] * len(batch)
        combined = (stats.combined_scores(distances, None if outside is None else stats.outside_scores(outside),
                                          outside_net_scores(model, inputs))
                    if stats is not None and stats.combined is not None else [None] * len(batch))
        for prepared, p, distance, upside_down, score in zip(batch, probabilities(model, logits), distances, turned,
                                                             combined):
            outcome, reason = guard_outcome(prepared, distance, stats, upside_down, spec, score)
            out.append(Prediction(float(p), model.version, outcome, reason, model.card.borderline))
    return out


def guard_outcome(prepared: ModelInput, distance: float | None, stats: "O.OodStats | None",
                  upside_down: float | None, spec: dict, combined: float | None = None) -> tuple[str, str]:
    """(outcome, reason) of the intended-use guard (``xray.guard``): the DICOM header first, then the
    cheap input checks, then a film that looks inverted, then the feature checks (``combined``: the image's
    ``OodStats.combined_scores`` value when the version has a home-vs-outside score). A header that puts the
    film inside the intended use does not skip the image checks: the pixels still decide about the equipment."""
    outcome, reason = guard.header_outcome(prepared.guard_fields, spec)
    if outcome != guard.VERDICT:
        return outcome, reason
    input_reason = O.input_reason(prepared.pixels, prepared.shape, prepared.colourfulness)
    feature_reason = "" if input_reason else guard.negative_film_reason(  # before "unlike the training films"
        prepared.pixels, dicom=bool(prepared.guard_fields))
    if not input_reason and not feature_reason and stats is not None and distance is not None:
        feature_reason = O.feature_reason(float(distance), float(upside_down if upside_down is not None else -np.inf),
                                          stats, float(combined if combined is not None else -np.inf))
    return guard.image_outcome(input_reason, feature_reason)
