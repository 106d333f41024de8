"""Model registry: one folder per version (weights + model card), one marker naming the active one.

Two layers by default: the **shipped** versions in the repository's ``weights/`` (read-only: never
written by the app) and the **site** registry in the per-user data folder (``settings.user_data_dir()
/ registry``), which holds versions trained or calibrated here, the active marker and the site
settings (``site.json``). Versions are looked up in the site registry first, then in the shipped one;
until the site activates something, the shipped marker says which version is active.
$XRAY_WEIGHTS (or an explicit root) makes one folder the whole registry, with no shipped layer.

Layout under a registry root:
    active.json                 {"version": ID, "history": [previously active IDs, newest last]}
    versions/ID/model.pt        state_dict
    versions/ID/card.json       model card, including the SHA-256 of model.pt
A version folder is assembled under a hidden temporary name and renamed into place, and every file
is written atomically, so a crash never leaves a partial version or a marker pointing at one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from xray.clock import utc_now, utc_stamp
from xray import settings
from xray.atomic import atomic_write_bytes, atomic_write_json
from xray.model.card import CardError, ModelCard
from xray.model.net import PneumoniaNet, fold_batchnorm, place
from xray.model.net import build_net as model_build_net
from xray.model.ood import OodStats
from xray.model.outside_net import OUTSIDE_NET_FILE, OutsideEnsemble
from xray.model.site import SiteSettings

PACKAGE_ROOT = settings.PACKAGE_ROOT
DEFAULT_REGISTRY = settings.SHIPPED_REGISTRY
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def default_registry_path() -> Path:
    return settings.registry_path()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelFileError(ValueError):
    """A version's files are missing, damaged or inconsistent with its card."""


@dataclass
class LoadedModel:
    """A model ready for inference, with the card that travels with it."""

    net: PneumoniaNet
    card: ModelCard
    device: torch.device
    ood_stats: OodStats | None = None  # training-feature statistics; None = no feature OOD check
    outside_net: "OutsideEnsemble | None" = None  # the guard's home-vs-outside networks (``outside_net.pt``), if any
    site_threshold: float | None = None  # the threshold the site saved for this version, if any
    site_threshold_note: str = ""  # who saved it, when, why
    _folded: "PneumoniaNet | None" = field(default=None, repr=False, compare=False)

    @property
    def inference_net(self) -> PneumoniaNet:
        """``net`` with BatchNorm folded into the convolutions, made on first use: what ``predict``
        runs (Grad-CAM and fine-tuning use ``net`` itself)."""
        if self._folded is None:
            self._folded = place(fold_batchnorm(self.net), self.device)
        return self._folded

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def threshold(self) -> float:
        """The card's own operating threshold, exactly as stored."""
        return self.card.threshold

    @property
    def default_threshold(self) -> float:
        """The operating threshold the app and the CLI start from: the site's saved one, else the card's."""
        return self.card.threshold if self.site_threshold is None else self.site_threshold

    @property
    def image_size(self) -> int:
        return self.card.image_size

    @property
    def calibration(self) -> tuple[float, float]:
        """(scale, bias): p = sigmoid(scale * logit + bias)."""
        return self.card.calibration


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def net_for_card(card: ModelCard | Mapping[str, Any]) -> PneumoniaNet:
    card = card if isinstance(card, ModelCard) else ModelCard.from_dict(card)
    return model_build_net(card.config)


class ReadOnlyVersion(ValueError):
    """A shipped version's files cannot be changed (site choices go to the site settings)."""


class Registry:
    def __init__(self, root: str | os.PathLike | None = None, shipped: str | os.PathLike | None = None):
        """``root``: the writable registry (default: $XRAY_WEIGHTS, else the site registry in the user
        data folder); ``shipped``: the read-only layer (default: the repository's ``weights/`` when
        neither ``root`` nor $XRAY_WEIGHTS is given, else none)."""
        if root is None and not settings.registry_overridden():
            root = settings.site_registry_path()
        if shipped is None and Path(root or settings.registry_path()).resolve() == settings.site_registry_path().resolve():
            shipped = settings.SHIPPED_REGISTRY  # the site registry always sees the shipped versions
        self.root = Path(root) if root is not None else default_registry_path()
        self.shipped = Path(shipped) if shipped is not None and Path(shipped).resolve() != self.root.resolve() else None
        self.site = SiteSettings(self.root)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def marker(self) -> Path:
        return self.root / "active.json"

    def is_shipped(self, version: str) -> bool:
        """True for a version that lives in the read-only shipped layer."""
        return (self.shipped is not None and not (self.versions_dir / version / "card.json").is_file()
                and (self.shipped / "versions" / version / "card.json").is_file())

    def version_dir(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"invalid version id {version!r}")
        if self.is_shipped(version):
            return self.shipped / "versions" / version
        return self.versions_dir / version

    # -- reading --------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions (those with a card), oldest first, shipped and site ones together."""
        folders = [d for d in (self.versions_dir, self.shipped / "versions" if self.shipped else None)
                   if d is not None and d.is_dir()]
        found = sorted({p.name for d in folders for p in d.iterdir() if self._complete(p.name)})

        def created(version: str) -> str:
            # One damaged card must not hide every other version (load() reports it when asked for it).
            try:
                card = self.card(version)
            except ModelFileError:
                return ""
            return card.created

        return sorted(found, key=lambda v: (created(v), v))

    def _complete(self, version: str) -> bool:
        """A version folder that was renamed into place whole (it has its card)."""
        return bool(VERSION_PATTERN.match(version)) and (self.version_dir(version) / "card.json").is_file()

    def card(self, version: str) -> ModelCard:
        """The version's card, validated (``xray.model.card.ModelCard``).

        Raises:
            ModelFileError: no card, unreadable JSON, or a card that is not a valid model card.
        """
        path = self.version_dir(version) / "card.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFileError(f"model version {version} has no card") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"model card of {version} is damaged: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelFileError(f"model card of {version} is damaged: not a JSON object")
        try:
            return ModelCard.from_dict(raw)
        except CardError as exc:
            raise ModelFileError(f"model card of {version} is not valid: {exc}") from None

    def _marker_state(self) -> dict:
        """The site's marker; before the site has activated anything, the shipped one without its history
        (the versions live where it was built were never live at this site: nothing to roll back to)."""
        for marker in (self.marker, self.shipped / "active.json" if self.shipped else None):
            if marker is None:
                continue
            try:
                state = json.loads(marker.read_text())
            except FileNotFoundError:
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
            if not isinstance(state, dict):
                return {}
            return state if marker == self.marker else {k: v for k, v in state.items() if k != "history"}
        return {}

    def state_key(self) -> tuple[str, str | None, int, int]:
        """(registry root, active version, its card's mtime, the site settings' mtime): changes when a version
        is activated, its card edited, or the site saves or restores a threshold (what a loaded model caches)."""
        version = self.active_version()

        def mtime(path) -> int:
            try:
                return os.stat(path).st_mtime_ns
            except OSError:
                return 0

        card = mtime(self.version_dir(version) / "card.json") if version is not None else 0
        return str(self.root.resolve()), version, card, mtime(self.site.path)

    def active_version(self) -> str | None:
        version = self._marker_state().get("version")
        return version if isinstance(version, str) and self._complete(version) else None

    def history(self) -> list[str]:
        return [v for v in self._marker_state().get("history", []) if isinstance(v, str)]

    def load(self, version: str | None = None, device: torch.device | None = None) -> LoadedModel:
        """Load a version (the active one by default), verifying its checksum.

        Raises:
            ModelFileError: missing, truncated or altered weights, or a card that does not match.
        """
        version = version or self.active_version()
        if version is None:
            raise ModelFileError(f"no active model in {self.root}")
        card = self.card(version)
        try:
            data = (self.version_dir(version) / "model.pt").read_bytes()
        except FileNotFoundError:
            raise ModelFileError(f"model version {version} has no weights file") from None
        if sha256_bytes(data) != card.weights_sha256:
            raise ModelFileError(f"weights of model {version} are damaged (checksum mismatch); refusing to load")
        extras = self._read_extras(version, card)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            net = net_for_card(card)
            net.load_state_dict(state)
        except Exception as exc:  # torch raises several types on bad archives or shapes
            raise ModelFileError(f"weights of model {version} cannot be loaded: {exc}") from None
        device = device or pick_device()
        net = place(net, device).eval()
        ood_stats, outside_net = None, None
        try:
            if "ood.npz" in extras:
                ood_stats = OodStats.from_bytes(extras["ood.npz"])
            if OUTSIDE_NET_FILE in extras:
                outside_net = OutsideEnsemble.from_bytes(extras[OUTSIDE_NET_FILE])
        except ValueError as exc:
            raise ModelFileError(f"model {version}: {exc}") from None
        if ood_stats is not None and ood_stats.net_scale is not None and outside_net is None:
            raise ModelFileError(f"model {version}: its guard statistics need {OUTSIDE_NET_FILE}, which it lacks")
        saved = self.site.saved_threshold(version)
        return LoadedModel(net, card, device, ood_stats, outside_net, saved.threshold if saved else None,
                           saved.provenance() if saved else "")

    def _read_extras(self, version: str, card: ModelCard) -> dict[str, bytes]:
        """The version's extra files, each checked against the SHA-256 in its card."""
        extras = {}
        for name, digest in card.extra_files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ModelFileError(f"model {version} lists an invalid extra file name {name!r}")
            try:
                blob = (self.version_dir(version) / name).read_bytes()
            except FileNotFoundError:
                raise ModelFileError(f"model version {version} lacks its file {name}") from None
            if sha256_bytes(blob) != digest:
                raise ModelFileError(f"file {name} of model {version} is damaged (checksum mismatch); refusing to load")
            extras[name] = blob
        return extras

    def load_with_fallback(self, device: torch.device | None = None) -> tuple[LoadedModel, list[str]]:
        """The active model or, if it is damaged, the newest earlier good one; plus the warnings."""
        problems: list[str] = []
        candidates = []
        state = self._marker_state()
        for v in [state.get("version"), *reversed(self.history()), *reversed(self.versions())]:
            if isinstance(v, str) and v not in candidates:
                candidates.append(v)
        for version in candidates:
            try:
                return self.load(version, device), problems
            except (ModelFileError, ValueError) as exc:
                problems.append(str(exc))
        raise ModelFileError("; ".join(problems) or f"no model versions in {self.root}")

    # -- writing --------------------------------------------------------------------------------
    def new_version_id(self, tag: str = "") -> str:
        stamp = utc_stamp()
        base = f"{stamp}-{tag}" if tag else stamp
        version, n = base, 1
        while (self.versions_dir / version).exists() or self.is_shipped(version):
            n += 1
            version = f"{base}-{n}"
        return version

    def save_version(self, net: torch.nn.Module, card: Mapping[str, Any], version: str | None = None,
                     extras: dict[str, bytes] | None = None) -> str:
        """Write weights + card (+ extra files, checksummed in the card) as a new, inactive version."""
        version = version or self.new_version_id()
        buffer = io.BytesIO()
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        torch.save(state, buffer)
        return self._write_version(buffer.getvalue(), card, version, extras)

    def _write_version(self, data: bytes, card: Mapping[str, Any], version: str,
                       extras: dict[str, bytes] | None) -> str:
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"invalid version id {version!r}")
        final = self.versions_dir / version
        if final.exists() or self.is_shipped(version):
            raise ValueError(f"model version {version} already exists")
        extras = extras or {}
        card = {**card, "version": version, "weights_sha256": sha256_bytes(data),
                "weights_bytes": len(data), "extra_files": {n: sha256_bytes(b) for n, b in extras.items()}}
        try:
            ModelCard.from_dict(card)  # never write a card the app could not load
        except CardError as exc:
            raise ValueError(f"refusing to save version {version}: {exc}") from None
        staging = self.versions_dir / f".{version}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        atomic_write_bytes(staging / "model.pt", data)
        for name, blob in extras.items():
            atomic_write_bytes(staging / name, blob)
        atomic_write_json(staging / "card.json", card)
        os.replace(staging, final)  # the version appears whole or not at all
        return version

    def save_version_bytes(self, weights: bytes, card: Mapping[str, Any], version: str,
                           extras: dict[str, bytes] | None = None) -> str:
        """``save_version`` with the weights file given as bytes, written unchanged (a version derived
        from another with the same weights, byte for byte: site calibration)."""
        return self._write_version(weights, card, version, extras)

    def save_derived_version(self, parent: str, card: Mapping[str, Any], tag: str,
                             extras: dict[str, bytes] | None = None, without: Sequence[str] = ()) -> str:
        """A new inactive version with ``parent``'s weights byte for byte (made without training: site
        calibration, added OOD statistics) and ``card`` (``ModelCard.derived``); ``parent``'s extra files
        come along unless ``extras`` replaces them or ``without`` names them. Returns the new id
        (``new_version_id(tag)``)."""
        parent_dir = self.version_dir(parent)
        files = {name: (parent_dir / name).read_bytes() for name in self.card(parent).extra_files
                 if name not in without}
        return self._write_version((parent_dir / "model.pt").read_bytes(), card, self.new_version_id(tag),
                                   {**files, **(extras or {})})

    def update_card(self, version: str, updates: Mapping[str, Any]) -> ModelCard:
        """Merge ``updates`` into a version's card atomically; the protected keys (``card.PROTECTED_KEYS``)
        cannot change. Raises ValueError (``CardError``) for those or for a card that would not validate."""
        if self.is_shipped(version):
            raise ReadOnlyVersion(f"model {version} is a shipped version: its card is read-only")
        card = self.card(version).updated(updates)
        atomic_write_json(self.version_dir(version) / "card.json", card.to_dict())
        return card

    def activate(self, version: str, override: Mapping[str, Any] | None = None) -> None:
        """Make ``version`` the one the app and CLI use; it must load cleanly first. This is the
        mechanism; the policy (the promotion gate) is ``xray.govern.promotion.promote``, which every user-facing
        path calls. ``override``: the gate override it was activated under (kept in the marker)."""
        self.load(version, torch.device("cpu"))
        state = self._marker_state()
        history = [v for v in state.get("history", []) if v != version]
        current = state.get("version")
        if current and current != version:
            history.append(current)
        marker = {"version": version, "history": history[-50:],
                  "activated": utc_now()}
        if override:
            marker["override"] = dict(override)
        atomic_write_json(self.marker, marker)

    def rollback(self) -> str:
        """Re-activate the previously active version; returns it."""
        state = self._marker_state()
        history = [v for v in state.get("history", []) if isinstance(v, str) and self._complete(v)]
        if not history:
            raise ValueError("no earlier model version to roll back to")
        previous = history.pop()
        self.load(previous, torch.device("cpu"))
        atomic_write_json(self.marker, {"version": previous, "history": history,
                                        "activated": utc_now()})
        return previous

    def clean_partials(self) -> list[str]:
        """Remove staging folders left by a process killed mid-save."""
        removed = []
        if self.versions_dir.is_dir():
            for p in self.versions_dir.iterdir():
                if p.name.startswith(".") and p.name.endswith(".partial"):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed
