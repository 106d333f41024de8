"""Out-of-distribution check: "this does not look like a chest X-ray".

Two parts, both run inside ``inference.predict`` (see docs/ood.md for the measurements):
1. cheap input checks on the decoded image: colour, extreme shape, almost no mid-tones;
2. a feature-space check: the Mahalanobis distance of the CNN's last-stage features, average-pooled
   on a 2x2 grid so that the layout counts (an upside-down chest has the right textures in the wrong
   places), to the training X-rays' features (Ledoit-Wolf shrunk covariance), flagged above a high
   percentile of the validation X-rays' distances;
3. an upside-down check on the same features: the Fisher direction from the training X-rays to the
   same X-rays turned 180 degrees (the Mahalanobis check alone let about a third of those through);
4. (issue 23, versions fitted with outside films) a home-versus-outside score: a logistic regression on
   the last stage pooled on a 4x4 grid, trained on the training X-rays against chest films of other
   hospitals; it and the distance are each scaled by their spread on the validation X-rays and summed,
   and the sum has one limit (a percentile of the validation X-rays' sums), which replaces the distance's;
5. (issue 23, from version 20261202-*-cnn) in place of 4: small CNNs home-vs-outside on the 64-pixel
   histogram-equalised film (``xray.model.outside_net``, their own file ``outside_net.pt``); their averaged
   logit and the distance, each scaled by its validation spread, summed under one limit the same way.
Its statistics travel with the weights as ``ood.npz``.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from xray.model.net import to_input
from xray.model.outside_net import OUTSIDE_NET_FILE, OutsideEnsemble, OutsideNetConfig, fit_outside_net

OOD_FILE = "ood.npz"  # extra file of a model version, checksummed in its card
DEFAULT_PERCENTILE = 99.5  # of validation X-rays' distances; the feature check's threshold
UPSIDE_DOWN_PERCENTILE = 99.9  # of validation X-rays' upside-down scores; that check's threshold
MAX_FEATURES = 1024  # the largest grid whose C * grid^2 features stay within this (the shipped p4s net's 64 x 4 x 4);
# beyond it the precision matrix grows as the square (an ensemble of three 128-channel nets on 4x4: 6,144
# features, a 280 MB file) while the training set stays at about 4,400 images to estimate it from
DEFAULT_GRID = 4  # last-stage features pooled on a GRID x GRID grid; 1 = global pooling, 2 = versions before issue 13 (docs/ood.md)
# Input-check limits, chosen with margin from the training X-rays (docs/ood.md, scripts/measure_ood.py).
MAX_COLOURFULNESS = 12.0  # Hasler-Suesstrunk on 0-255; grey JPEGs measure < 1, photos 20-100
MAX_ASPECT = 2.5  # radiographs in the data set are 1.0-1.8 : 1; the loader refuses beyond 4
MIN_MIDTONES = 0.25  # fraction of input pixels in grey levels 26-229; documents and line art have few
MIDTONE_RANGE = (26, 229)  # uint8 grey levels counted as mid-tones (10%-90%)
OUTSIDE_GRID = 4  # the home-versus-outside score reads the last stage on this grid (docs/ood.md, round 4)
OUTSIDE_C = 0.01  # inverse L2 strength of that logistic regression on standardised features (scikit-learn's C)
SPREAD_PERCENTILE = 99.0  # a score's spread on validation: its 99th percentile minus its median


@dataclass(frozen=True)
class OodStats:
    """Training-feature statistics of one model version."""

    mean: np.ndarray  # (C,) mean pooled feature of the training X-rays
    precision: np.ndarray  # (C, C) inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance above which an image is flagged
    percentile: float  # of validation distances the threshold was set at
    shrinkage: float  # Ledoit-Wolf weight of the scaled identity
    n_train: int  # training images the statistics come from
    grid: int = 1  # features pooled on a grid x grid grid (``grid_features``); 1 = global average
    upside_down: "np.ndarray | None" = None  # (C,) Fisher direction upright -> turned 180 degrees; None = no check
    upside_down_threshold: float = float("inf")  # score along it above which an image is flagged
    outside: "np.ndarray | None" = None  # (C_last * OUTSIDE_GRID^2,) home-vs-outside weights; None = distance only
    outside_bias: float = 0.0  # its intercept (log-odds of "outside")
    outside_grid: int = OUTSIDE_GRID  # grid of the features it reads
    combined: "np.ndarray | None" = None  # (4,) distance median, distance spread, outside median, outside spread;
    # (2,) distance median and spread when the sum has no logistic term (the networks' version)
    combined_threshold: float = float("inf")  # limit of the summed scaled scores (replaces ``threshold``)
    n_outside: int = 0  # outside films the weights (or the networks) were fitted on
    net_scale: "np.ndarray | None" = None  # (2,) median and spread of the outside networks' score on validation;
    # None = no network term (``outside_net.OutsideEnsemble``, saved beside as ``outside_net.pt``)

    def outside_scores(self, features: np.ndarray) -> np.ndarray:
        """(B, C_last * outside_grid^2) features -> (B,) log-odds that the film is from elsewhere (-inf without)."""
        features = np.asarray(features, dtype=np.float64)
        if self.outside is None:
            return np.full(len(features), -np.inf)
        return (torch.from_numpy(features) @ torch.from_numpy(self.outside)).numpy() + self.outside_bias

    def combined_scores(self, distances: np.ndarray, outside: "np.ndarray | None" = None,
                        net: "np.ndarray | None" = None) -> np.ndarray:
        """(B,) distances, logistic outside scores and outside networks' scores -> (B,) the sum of those the
        statistics use, each scaled by its validation spread (-inf without a combined limit)."""
        if self.combined is None:
            return np.full(len(distances), -np.inf)
        total = (np.asarray(distances, np.float64) - self.combined[0]) / self.combined[1]
        if self.outside is not None:
            total = total + (np.asarray(outside, np.float64) - self.combined[2]) / self.combined[3]
        if self.net_scale is not None:
            if net is None:
                raise ValueError("these statistics need the outside networks' scores")
            total = total + (np.asarray(net, np.float64) - self.net_scale[0]) / self.net_scale[1]
        return total

    def upside_down_scores(self, features: np.ndarray) -> np.ndarray:
        """(B, C) features -> (B,) projection on the upside-down direction (-inf without one)."""
        features = np.asarray(features, dtype=np.float64)
        if self.upside_down is None:
            return np.full(len(features), -np.inf)
        return (torch.from_numpy(features - self.mean) @ torch.from_numpy(self.upside_down)).numpy()  # see distances

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(B, C) features -> (B,) Mahalanobis distances."""
        centred = torch.from_numpy(np.asarray(features, dtype=np.float64) - self.mean)
        # a matrix product in torch: its thread setting holds (NumPy's BLAS would start threads that
        # spin on the cores the decoding processes use); numpy.einsum was 10% of predict
        squared = ((centred @ torch.from_numpy(self.precision)) * centred).sum(dim=1).numpy()
        return np.sqrt(np.clip(squared, 0.0, None))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=self.mean, precision=self.precision, threshold=self.threshold,
                            percentile=self.percentile, shrinkage=self.shrinkage, n_train=self.n_train,
                            grid=self.grid, **({} if self.upside_down is None else {
                                "upside_down": self.upside_down, "upside_down_threshold": self.upside_down_threshold}),
                            **({} if self.outside is None else {
                                "outside": self.outside, "outside_bias": self.outside_bias,
                                "outside_grid": self.outside_grid}),
                            **({} if self.combined is None else {
                                "combined": self.combined, "combined_threshold": self.combined_threshold,
                                "n_outside": self.n_outside}),
                            **({} if self.net_scale is None else {"net_scale": self.net_scale}))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "OodStats":
        """Parse ``ood.npz``; ValueError when it is not a consistent statistics file."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                stats = cls(np.asarray(f["mean"], np.float64), np.asarray(f["precision"], np.float64),
                            float(f["threshold"]), float(f["percentile"]), float(f["shrinkage"]),
                            int(f["n_train"]), int(f["grid"]) if "grid" in f.files else 1,
                            np.asarray(f["upside_down"], np.float64) if "upside_down" in f.files else None,
                            float(f["upside_down_threshold"]) if "upside_down" in f.files else float("inf"))
                if "outside" in f.files:
                    stats = dataclasses.replace(
                        stats, outside=np.asarray(f["outside"], np.float64), outside_bias=float(f["outside_bias"]),
                        outside_grid=int(f["outside_grid"]))
                if "combined" in f.files:
                    stats = dataclasses.replace(
                        stats, combined=np.asarray(f["combined"], np.float64),
                        combined_threshold=float(f["combined_threshold"]), n_outside=int(f["n_outside"]))
                if "net_scale" in f.files:
                    stats = dataclasses.replace(stats, net_scale=np.asarray(f["net_scale"], np.float64))
        except Exception as exc:  # zip, key and dtype errors all mean a damaged file
            raise ValueError(f"OOD statistics file is damaged: {exc}") from None
        c = stats.mean.shape[0]
        if (stats.mean.ndim != 1 or stats.precision.shape != (c, c) or not np.isfinite(stats.precision).all()
                or stats.grid < 1 or c % (stats.grid * stats.grid)
                or (stats.upside_down is not None and (stats.upside_down.shape != (c,)
                                                       or not np.isfinite(stats.upside_down).all()))
                or (stats.outside is not None and (
                    stats.outside.shape != (c // (stats.grid * stats.grid) * stats.outside_grid ** 2,)
                    or not np.isfinite(stats.outside).all() or stats.combined is None
                    or stats.combined.shape != (4,)))
                or (stats.combined is not None and (
                    stats.combined.shape not in ((2,), (4,)) or not np.isfinite(stats.combined).all()
                    or min(stats.combined[1::2]) <= 0 or (stats.outside is None and stats.net_scale is None)))
                or (stats.net_scale is not None and (
                    stats.net_scale.shape != (2,) or not np.isfinite(stats.net_scale).all()
                    or stats.net_scale[1] <= 0 or stats.combined is None))):
            raise ValueError("OOD statistics file has inconsistent shapes or values")
        return stats

    def summary(self) -> dict:
        """For the model card."""
        pooling = "pooled" if self.grid == 1 else f"{self.grid}x{self.grid}-grid pooled"
        out = {"method": f"Mahalanobis distance of {pooling} last-stage features, Ledoit-Wolf shrinkage",
               "threshold": round(self.threshold, 4), "percentile": self.percentile,
               "shrinkage": round(self.shrinkage, 4), "n_train": self.n_train, "features": int(self.mean.shape[0])}
        if self.upside_down is not None:
            out["upside_down_threshold"] = round(self.upside_down_threshold, 4)
        if self.outside is not None:
            grid = f"{self.outside_grid}x{self.outside_grid}"
            out["method"] += (f"; plus a home-vs-outside logistic regression on {grid}-grid pooled features "
                              f"({self.n_outside} outside films); the two scores scaled by their validation spread "
                              "and summed, one limit (replaces the distance's)")
        if self.net_scale is not None:
            out["method"] += (f"; plus home-vs-outside CNNs on the histogram-equalised film ({self.n_outside} outside "
                              f"films; {OUTSIDE_NET_FILE}); the distance and their score scaled by their validation "
                              "spread and summed, one limit (replaces the distance's)")
        if self.combined is not None:
            out["combined_threshold"] = round(self.combined_threshold, 4)
            out["n_outside"] = self.n_outside
        return out


def ledoit_wolf(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(N, C) -> mean, shrunk covariance, shrinkage (Ledoit & Wolf 2004, as in scikit-learn)."""
    x = np.asarray(features, dtype=np.float64)
    n, p = x.shape
    mean = x.mean(axis=0)
    x = x - mean
    cov = x.T @ x / n
    mu = np.trace(cov) / p
    x2 = x ** 2
    beta_sum = float((x2.T @ x2).sum())
    delta_sum = float((cov ** 2).sum())  # = sum((X^T X)^2) / n^2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2 * mu * np.trace(cov) + p * mu ** 2) / p
    shrinkage = 0.0 if delta == 0 else float(min(beta, delta) / delta)
    shrunk = (1 - shrinkage) * cov + shrinkage * mu * np.eye(p)
    return mean, shrunk, shrinkage


def fit_stats(train_features: np.ndarray, val_features: np.ndarray,
              percentile: float = DEFAULT_PERCENTILE, grid: int = DEFAULT_GRID) -> OodStats:
    """Mean/precision from training features; threshold at a percentile of validation distances."""
    if len(train_features) < 2 or len(val_features) < 1:
        raise ValueError("too few images to fit OOD statistics")
    mean, cov, shrinkage = ledoit_wolf(train_features)
    # A small ridge keeps the inverse finite when features are exactly collinear (dead channels).
    ridge = 1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    precision = np.linalg.inv(cov + ridge * np.eye(cov.shape[0]))
    stats = OodStats(mean, precision, 0.0, float(percentile), shrinkage, int(len(train_features)), grid)
    threshold = float(np.percentile(stats.distances(val_features), percentile))
    return OodStats(mean, precision, threshold, float(percentile), shrinkage, int(len(train_features)), grid)


def grid_features(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, h, w) last-stage map -> (B, C * grid * grid) averages over a grid x grid layout
    (grid 1: the classifier's own global average)."""
    return torch.nn.functional.adaptive_avg_pool2d(feature_map, grid).flatten(1)


@torch.no_grad()
def features_of(net: torch.nn.Module, images: torch.Tensor, device: torch.device, grid: int = DEFAULT_GRID,
                batch_size: int = 128) -> np.ndarray:
    """(N, S, S) uint8 model inputs -> (N, C * grid^2) features, preprocessed exactly as ``predict``."""
    net.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size].unsqueeze(1), device, net.config)
        out.append(grid_features(net.feature_map(x), grid).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def grid_for(channels: int) -> int:
    """The largest grid <= DEFAULT_GRID whose ``channels * grid^2`` features fit MAX_FEATURES (at least 1)."""
    return max([g for g in range(1, DEFAULT_GRID + 1) if channels * g * g <= MAX_FEATURES] or [1])


def input_reason(inputs: np.ndarray, shape: tuple[int, int], colour: float) -> str:
    """Cheap checks on one image; '' when it passes.

    Args:
        inputs: (S, S) uint8 model input (after the squash-resize).
        shape: (H, W) of the decoded image.
        colour: its colourfulness before grey conversion (``XrayImage.colourfulness``).
    """
    if colour > MAX_COLOURFULNESS:
        return f"a colour image (colourfulness {colour:.0f}; an X-ray is grey)"
    height, width = shape
    aspect = max(height, width) / max(1, min(height, width))
    if aspect > MAX_ASPECT:
        return f"an extreme shape for a chest radiograph ({width}x{height} pixels)"
    low, high = MIDTONE_RANGE
    midtones = float(np.mean((inputs >= low) & (inputs <= high)))
    if midtones < MIN_MIDTONES:
        return f"almost no mid-grey tones ({midtones:.0%} of pixels), like a document or line drawing"
    return ""


EQUIPMENT_OR_AGE = ("the film looks unlike the pediatric films the model was made for: another kind of equipment "
                    "or an older patient")


def feature_reason(distance: float, upside_down: float, stats: OodStats, combined: float = -np.inf) -> str:
    """The feature checks' reason for one image ('' when it passes); ``combined`` is its
    ``combined_scores`` value (used when the statistics have a home-vs-outside score)."""
    if stats.combined is not None:
        if combined > stats.combined_threshold:
            return f"{EQUIPMENT_OR_AGE} (guard score {combined:.1f}; limit {stats.combined_threshold:.1f})"
    elif distance > stats.threshold:
        return (f"the film is unlike the pediatric training films: another kind of equipment or exposure, an "
                f"adult, or another view (feature distance {distance:.1f}; limit {stats.threshold:.1f})")
    if upside_down > stats.upside_down_threshold:
        return (f"the film appears to be turned upside down (score {upside_down:.1f}; limit "
                f"{stats.upside_down_threshold:.1f}): re-orient it and upload it again")
    return ""


def fit_upside_down(stats: OodStats, train_features: np.ndarray, turned_features: np.ndarray,
                    val_features: np.ndarray, percentile: float = UPSIDE_DOWN_PERCENTILE) -> OodStats:
    """``stats`` with the upside-down check: Fisher's direction (shared precision) from the training
    features to those of the same images turned 180 degrees; threshold at a percentile of the
    validation X-rays' scores."""
    direction = stats.precision @ (np.mean(turned_features, axis=0) - np.mean(train_features, axis=0))
    scores = (np.asarray(val_features, dtype=np.float64) - stats.mean) @ direction
    return dataclasses.replace(stats, upside_down=direction,
                               upside_down_threshold=float(np.percentile(scores, percentile)))


def fit_for_images(net: torch.nn.Module, images: torch.Tensor, train: np.ndarray, val: np.ndarray,
                   device: torch.device, percentile: float = DEFAULT_PERCENTILE) -> tuple[OodStats, dict]:
    """All OOD statistics of a trained net from its (N, S, S) uint8 training set and split; with the
    card's summary (including the share of validation X-rays the feature checks flag)."""
    grid = grid_for(net.config.widths[-1] * net.config.members)  # the last stage's channels, every member's
    train_features = features_of(net, images[train], device, grid)
    val_features = features_of(net, images[val], device, grid)
    turned = features_of(net, torch.flip(images[train], dims=(1, 2)), device, grid)  # 180 degrees
    stats = fit_upside_down(fit_stats(train_features, val_features, percentile, grid), train_features, turned,
                            val_features)
    flagged = ((stats.distances(val_features) > stats.threshold)
               | (stats.upside_down_scores(val_features) > stats.upside_down_threshold))
    return stats, {**stats.summary(), "val_flagged": float(np.mean(flagged))}


def logistic_regression(x: np.ndarray, y: np.ndarray, c: float = OUTSIDE_C) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression with balanced class weights: (N, F) features, (N,) 0/1 labels ->
    (F,) weights and intercept on the standardised features (each feature to the mean and standard
    deviation of class 0); the objective of scikit-learn's ``LogisticRegression(C=c,
    class_weight="balanced")`` (intercept not penalised), solved by L-BFGS. Returns weights and intercept
    that apply to the raw features."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("both classes are needed")
    centre, scale = x[~y].mean(axis=0), x[~y].std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = torch.from_numpy((x - centre) / scale)
    sign = torch.from_numpy(np.where(y, 1.0, -1.0))
    weight = torch.from_numpy(np.where(y, len(y) / (2.0 * y.sum()), len(y) / (2.0 * (~y).sum())))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                               history_size=20, line_search_fn="strong_wolfe")

    def objective():
        solver.zero_grad()
        loss = 0.5 * (w * w).sum() + c * (weight * torch.nn.functional.softplus(-sign * (z @ w + b))).sum()
        loss.backward()
        return loss

    solver.step(objective)
    weights = w.detach().numpy() / scale
    return weights, float(b.detach()) - float(weights @ centre)


def fit_outside(stats: OodStats, home_train: np.ndarray, outside: np.ndarray, home_val: np.ndarray,
                val_distances: np.ndarray, percentile: float | None = None, c: float = OUTSIDE_C) -> OodStats:
    """``stats`` with the home-vs-outside score and the combined limit (docs/ood.md, round 4).

    Args:
        home_train, outside, home_val: (N, C_last * OUTSIDE_GRID^2) features of the training X-rays, of chest
            films from other hospitals, and of the validation X-rays.
        val_distances: (N_val,) the validation X-rays' Mahalanobis distances (``stats.distances``).
        percentile: of the validation X-rays' combined scores, the limit (default: ``stats.percentile``).
    """
    percentile = stats.percentile if percentile is None else percentile
    weights, bias = logistic_regression(np.concatenate([home_train, outside]),
                                        np.r_[np.zeros(len(home_train)), np.ones(len(outside))], c)
    fitted = dataclasses.replace(stats, outside=weights, outside_bias=bias, outside_grid=OUTSIDE_GRID,
                                 n_outside=int(len(outside)))
    val_outside = fitted.outside_scores(home_val)
    fitted = dataclasses.replace(fitted, combined=np.array([*_spread(val_distances), *_spread(val_outside)]))
    limit = float(np.percentile(fitted.combined_scores(val_distances, val_outside), percentile))
    return dataclasses.replace(fitted, combined_threshold=limit)


def _spread(values: np.ndarray) -> tuple[float, float]:
    """A score's median on the validation X-rays and its spread (SPREAD_PERCENTILE minus the median)."""
    median = float(np.median(values))
    return median, max(float(np.percentile(values, SPREAD_PERCENTILE)) - median, 1e-9)


def fit_net_limit(stats: OodStats, val_distances: np.ndarray, val_net: np.ndarray, n_outside: int,
                  percentile: float | None = None) -> OodStats:
    """``stats`` (distance only) with the outside networks' term and the combined limit (docs/ood.md, round 4):
    the distance and the networks' score each scaled by their spread on the validation X-rays, summed; the
    limit at ``percentile`` (default ``stats.percentile``) of the validation X-rays' sums.

    Args:
        val_distances, val_net: (N_val,) the validation X-rays' distances and ``OutsideEnsemble.score``.
        n_outside: outside films the networks were trained on (for the card).
    """
    percentile = stats.percentile if percentile is None else percentile
    fitted = dataclasses.replace(stats, outside=None, combined=np.array(_spread(val_distances)),
                                 net_scale=np.array(_spread(val_net)), n_outside=int(n_outside))
    limit = float(np.percentile(fitted.combined_scores(val_distances, net=val_net), percentile))
    return dataclasses.replace(fitted, combined_threshold=limit)


def fit_net_for_images(net: torch.nn.Module, stats: OodStats, images: torch.Tensor, train: np.ndarray,
                       val: np.ndarray, outside: torch.Tensor, device: torch.device, config: OutsideNetConfig | None = None,
                       percentile: float | None = None, progress=lambda member, epoch, loss: None
                       ) -> tuple[OodStats, OutsideEnsemble, dict]:
    """Train the outside networks (``outside_net.fit_outside_net``) on the (N, S, S) uint8 training films
    against (M, S, S) uint8 outside films and set the combined limit on the validation films; with the
    card's summary (including the share of validation X-rays the feature checks now flag)."""
    ensemble = fit_outside_net(images[train], outside, config or OutsideNetConfig(), progress)
    val_grid = features_of(net, images[val], device, stats.grid)
    val_distances = stats.distances(val_grid)
    val_net = ensemble.score(images[val])
    fitted = fit_net_limit(stats, val_distances, val_net, len(outside), percentile)
    flagged = ((fitted.combined_scores(val_distances, net=val_net) > fitted.combined_threshold)
               | (fitted.upside_down_scores(val_grid) > fitted.upside_down_threshold))
    return fitted, ensemble, {**fitted.summary(), "val_flagged": float(np.mean(flagged)),
                              "outside_net": ensemble.summary()}


def fit_outside_for_images(net: torch.nn.Module, stats: OodStats, images: torch.Tensor, train: np.ndarray,
                           val: np.ndarray, outside: torch.Tensor, device: torch.device,
                           percentile: float | None = None) -> tuple[OodStats, dict]:
    """``fit_outside`` from (N, S, S) uint8 model inputs: the training set with its split, and (M, S, S)
    outside hospitals' chest films; with the card's summary (including the share of validation X-rays
    the feature checks now flag)."""
    val_grid = features_of(net, images[val], device, stats.grid)
    val_distances = stats.distances(val_grid)
    val_outside = features_of(net, images[val], device, OUTSIDE_GRID)
    fitted = fit_outside(stats, features_of(net, images[train], device, OUTSIDE_GRID),
                         features_of(net, outside, device, OUTSIDE_GRID), val_outside, val_distances, percentile)
    flagged = ((fitted.combined_scores(val_distances, fitted.outside_scores(val_outside)) > fitted.combined_threshold)
               | (fitted.upside_down_scores(val_grid) > fitted.upside_down_threshold))
    return fitted, {**fitted.summary(), "val_flagged": float(np.mean(flagged))}


def measured_phrase(ood: Mapping[str, Any]) -> str:
    """The guard's leave-one-source-out figures in one sentence, from a card's ``ood`` block (recorded by
    scripts/guard_loso.py --record); '' when the version has none."""
    loso = ood.get("leave_one_source_out") if isinstance(ood, Mapping) else None
    if not isinstance(loso, Mapping) or not loso.get("folds"):
        return ""
    share = lambda k, n: f"{k} of {n} ({100 * k / n:.1f}%)" if n else "none"  # noqa: E731
    folds = "; ".join(f"{share(f['withheld'], f['n'])} {f['measured_on']} films when fitted on {f['fitted_on']}"
                      for f in loso["folds"])
    home = loso.get("home", {})
    val, samples = home.get("validation", (0, 0)), home.get("samples", (0, 0))
    return (f"Films from a hospital the guard was not fitted on, withheld: {folds}. Films like the training "
            f"data withheld: {share(*val)} of the validation films and {share(*samples)} of the full-resolution "
            f"samples.")
