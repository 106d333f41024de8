"""The node's work outside the C-STORE handler: score queued films with the active version, build their
results, deliver them to the destination with back-off, clean the spool.

Scoring is the product's one path: ``xray.io.loader.load_image``, ``xray.serve.inference.predict``
(the intended-use guard included), the decision at the version's threshold in force
(``Prediction.decision``: the rule and the band), the CSV row of ``xray.serve.pipeline.ResultRow``, one
audit line (``xray.govern.audit``, ``shown_in="report"``), and the SR and SC of
``xray.report.writers``. The results' UIDs are derived from the input's SOP Instance UID, so a film
scored or sent again after a crash gives the PACS the same objects, never a second result.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from xray.atomic import atomic_write_bytes
from xray.govern import audit
from xray.io.loader import XrayImage, load_image
from xray.model.registry import LoadedModel, Registry
from xray.node.spool import Spool
from xray.report import writers as R
from xray.serve.analysis import Analysis
from xray.serve.inference import Prediction, predict
from xray.serve.pipeline import UNREADABLE, ResultRow

LOG = logging.getLogger("xray.node")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
RESULT_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # Explicit, Implicit VR Little Endian
# PS3.4 B.2.3: Success and the warnings (coercion, elements discarded, does not match SOP class): stored
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Destination:
    """Where results go: the PACS's AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def result_uid(sop_uid: str, role: str) -> str:
    """The UID of one result of one input (``role``: sr, sr-series, sc, sc-series): the same every time."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["xray-node", role, sop_uid])


class Models:
    """The active version, reloaded when it is changed (activation, rollback, a saved site threshold)."""

    def __init__(self, registry: str | None = None):
        self.registry = registry
        self.key: tuple | None = None
        self.model: LoadedModel | None = None

    def _key(self) -> tuple:
        return Registry(self.registry).state_key()

    def current(self) -> LoadedModel:
        """Raises ModelFileError when there is no loadable version (the films wait in the queue)."""
        key = self._key()
        if key != self.key or self.model is None:
            model, problems = Registry(self.registry).load_with_fallback()
            for problem in problems:
                LOG.warning("%s; scoring with model %s", problem, model.version)
            LOG.info("scoring with model %s (threshold %.6f)", model.version, model.default_threshold)
            self.model, self.key = model, key
        return self.model

    def prevalence_in_force(self, model: LoadedModel) -> float:
        """The site's saved prevalence, else the version's calibration prevalence (one owner: SiteSettings)."""
        return Registry(self.registry).site.prevalence_in_force(model.card.calibration_prevalence)


def score(model: LoadedModel, spool: Spool, rows: list, prevalence: float | None = None) -> None:
    """Score ``rows`` (queued films), write their results into ``out/`` and record them. ``prevalence``: the
    one in force (``SiteSettings.prevalence_in_force``; default the version's calibration prevalence), for
    the CSV row's last columns; the decision never depends on it."""
    calibrated_at = model.card.calibration_prevalence
    prevalence = calibrated_at if prevalence is None else prevalence
    threshold = model.default_threshold
    loaded: list[tuple] = []
    for row in rows:
        path = spool.root / "in" / row["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            loaded.append((row, b"", None, f"the spooled object cannot be read: {exc.strerror or exc}"))
            continue
        try:
            loaded.append((row, data, load_image(data, name=f"{row['sop_uid']}.dcm"), ""))
        except ValueError as exc:
            loaded.append((row, data, None, " ".join(str(exc).split())))
    images = [image for _, _, image, _ in loaded if image is not None]
    try:
        predictions = iter(predict(model, images) if images else [])
    except Exception:  # one film breaks the batch: score each alone, so only that one goes without a verdict
        LOG.exception("scoring a batch failed; scoring its films one at a time")
        predictions = iter([_alone(model, image) for image in images])
    for row, data, image, error in loaded:
        prediction = next(predictions) if image is not None else None
        if isinstance(prediction, str):
            image, prediction, error = None, None, prediction
        try:
            _record(model, spool, row, data, image, prediction, error, threshold, (calibrated_at, prevalence))
        except Exception as exc:  # a result that cannot be built stays visible, undelivered, with why
            LOG.exception("no result could be built for %s", row["sop_uid"])
            spool.scored(row["sop_uid"], {"model_version": model.version, "threshold": threshold, "label": "",
                                          "error": f"no result could be built: {exc}", "outcome": UNREADABLE,
                                          "results": json.dumps([]),
                                          "last_error": f"no result could be built: {exc}"})


def _alone(model: LoadedModel, image: XrayImage) -> Prediction | str:
    try:
        return predict(model, [image])[0]
    except Exception as exc:
        return f"scoring failed: {' '.join(str(exc).split())[:200]}"


def _record(model: LoadedModel, spool: Spool, row, data: bytes, image: XrayImage | None,
            prediction: Prediction | None, error: str, threshold: float, prevalence: tuple[float, float]) -> None:
    sop_uid = row["sop_uid"]
    analysis = Analysis(f"{sop_uid}.dcm", row["sha256"], image, prediction, error)
    result = ResultRow.of(sop_uid, prediction, error, threshold, prevalence, row["sha256"])  # the CSV's row
    csv = result.csv()
    if prediction is not None:
        audit.record(row["sha256"], prediction, threshold, "report")  # before the result leaves the node
    header = R.read_dicom_header(data)
    if header is None:
        raise ValueError("the spooled object's header cannot be read")
    item = R.ReportInput(analysis, threshold, prevalence[1], header)
    stem = spool.inbox_path(sop_uid).stem
    files, sc_uid = [], None
    if prediction is not None and not prediction.withheld:  # the evidence map, for a verdict only
        sc_uid = result_uid(sop_uid, "sc")
        sc = R.secondary_capture(model, item, result_uid(sop_uid, "sc-series"), sc_uid)
        atomic_write_bytes(spool.outbox / f"{stem}.sc.dcm", R.dicom_bytes(sc))
        files.append(f"{stem}.sc.dcm")
    sr_uid = result_uid(sop_uid, "sr")
    sr = R.structured_report(model, item, header, (result_uid(sop_uid, "sr-series"), sr_uid))
    atomic_write_bytes(spool.outbox / f"{stem}.sr.dcm", R.dicom_bytes(sr))
    files.append(f"{stem}.sr.dcm")
    spool.scored(sop_uid, {
        "model_version": model.version, "threshold": threshold, "label": result.label, "error": result.error,
        "outcome": result.outcome,
        "p_pneumonia": None if prediction is None else float(prediction.p_pneumonia),
        "band": json.dumps(list(prediction.band)) if prediction is not None and prediction.band else None,
        "csv_row": json.dumps(csv), "results": json.dumps(files), "sr_uid": sr_uid, "sc_uid": sc_uid})
    LOG.info("scored %s: %s", sop_uid, result.label or f"not assessed ({result.error})")


def backoff(attempts: int, longest: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 2, 4, 8, ... up to ``longest``."""
    return float(min(longest, 2.0 * 2 ** max(0, attempts)))


def deliver(spool: Spool, rows: list, ae_title: str, destination: Destination, retry_max_s: float,
            keep_s: float) -> int:
    """Send each row's results (SC, then SR) by C-STORE in one association; returns how many films were
    delivered. A film whose results were not all stored stays ``scored`` with the reason and a later try."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for uid in (SECONDARY_CAPTURE, COMPREHENSIVE_SR):
        ae.add_requested_context(uid, RESULT_SYNTAXES)
    todo = [r for r in rows if json.loads(r["results"] or "[]")]
    if not todo:
        return 0
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted \
            else "no answer (connection refused or timed out)"
        for row in todo:
            _failed(spool, row, f"destination {destination} unreachable: {why}", retry_max_s)
        return 0
    done = 0
    try:
        for row in todo:
            problem = ""
            for name in json.loads(row["results"]):
                path = spool.outbox / name
                try:
                    status = assoc.send_c_store(path)
                except Exception as exc:
                    problem = f"sending {name} failed: {exc}"
                    break
                code = int(status.Status) if status is not None and "Status" in status else None
                if code not in STORED:
                    comment = str(status.get("ErrorComment", "")) if status is not None else ""
                    problem = (f"destination {destination} answered status 0x{code:04X} {comment}".strip()
                               if code is not None else f"destination {destination} did not answer (association lost)")
                    break
            if problem:
                _failed(spool, row, problem, retry_max_s)
                if not assoc.is_established:
                    for rest in todo[todo.index(row) + 1:]:
                        _failed(spool, rest, f"destination {destination} unreachable: association lost", retry_max_s)
                    break
                continue
            spool.delivered(row["sop_uid"])
            done += 1
            LOG.info("delivered the results of %s to %s", row["sop_uid"], destination)
            for name in json.loads(row["results"]):
                _unlink(spool.outbox / name)
    finally:
        if assoc.is_established:
            assoc.release()
    if keep_s <= 0:
        clean(spool, 0)
    return done


def _failed(spool: Spool, row, reason: str, retry_max_s: float) -> None:
    wait = backoff(row["attempts"], retry_max_s)
    LOG.warning("results of %s not delivered (try %d): %s; next try in %.0f s", row["sop_uid"], row["attempts"] + 1,
                reason, wait)
    spool.delivery_failed(row["sop_uid"], reason, wait)


def clean(spool: Spool, keep_s: float) -> int:
    """Delete the received objects of films delivered over ``keep_s`` ago (their rows stay); returns how many."""
    rows = spool.to_clean(keep_s)
    for row in rows:
        for name in json.loads(row["results"] or "[]"):  # left behind by a crash just after delivery
            _unlink(spool.outbox / name)
        _unlink(spool.root / "in" / row["file"])
        spool.cleaned(row["sop_uid"])
    return len(rows)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
