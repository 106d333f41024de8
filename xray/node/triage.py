"""The Worklist's engine (no streamlit): the node's films in triage order, what each row says, and a film
as the Diagnose page's detail view needs it (the recorded result, the spooled image).

The row shows what the node recorded and sent (the CSV row, the SR): the decision at the threshold
in force when it was scored, never re-decided at another threshold.
"""
from __future__ import annotations

import datetime as dt

from xray.decide.decision import BORDERLINE, NORMAL, PNEUMONIA
from xray.io.loader import load_image
from xray.node.spool import DELIVERED, RECEIVED, Spool
from xray.serve import guard
from xray.serve.analysis import Analysis
from xray.serve.inference import Prediction
from xray.serve.pipeline import UNREADABLE

NEWEST, URGENCY = "newest first", "by urgency"
# PNEUMONIA first, then BORDERLINE, then NORMAL; then films without a verdict, then those not yet scored
URGENCY_RANK = {PNEUMONIA: 0, BORDERLINE: 1, NORMAL: 2}


def urgency(film: dict) -> int:
    if film["state"] == RECEIVED:
        return 5
    if film["label"] in URGENCY_RANK:
        return URGENCY_RANK[film["label"]]
    return 3 if film["outcome"] != UNREADABLE else 4


def ordered(films: list[dict], order: str = NEWEST) -> list[dict]:
    """Newest first, or by urgency (then highest p(pneumonia), then newest)."""
    newest = sorted(films, key=lambda f: f["received"], reverse=True)
    if order != URGENCY:
        return newest
    return sorted(newest, key=lambda f: (urgency(f), -(f["p_pneumonia"] or 0.0) if f["label"] else 0.0))


def decision_text(film: dict) -> str:
    """PNEUMONIA / BORDERLINE / NORMAL, or why there is none."""
    if film["state"] == RECEIVED:
        return "waiting to be scored"
    if film["label"]:
        return film["label"]
    if film["outcome"] == UNREADABLE:
        return UNREADABLE
    return film["outcome"] or "no verdict"


def reason_text(film: dict) -> str:
    """Why a film has no verdict: a withheld film's reason in Diagnose's words (``guard.plain_reason``; the
    measurements are in its detail view), an unreadable film's error as the loader gave it."""
    prediction = prediction_of(film)
    if prediction is not None and prediction.withheld:
        return guard.plain_reason(prediction.withheld_reason) or film["error"] or ""
    return film["error"] or ""


def delivery_text(film: dict) -> str:
    """Where the film's results are: delivered (when), waiting (why, which try), not yet scored."""
    if film["state"] == RECEIVED:
        return "not scored yet"
    if film["state"] == DELIVERED:
        return f"delivered {local_time(film['delivered'])}"
    if film["last_error"]:
        return f"NOT DELIVERED after {film['attempts']} tries: {film['last_error']}"
    return "waiting for delivery"


def local_time(utc: str | None) -> str:
    if not utc:
        return ""
    return dt.datetime.fromisoformat(utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def received_text(film: dict) -> str:
    return local_time(film["received"])


def prediction_of(film: dict) -> Prediction | None:
    """The recorded result as a ``Prediction`` (None for an unreadable film or one not scored yet)."""
    if film["p_pneumonia"] is None or film["outcome"] in (None, UNREADABLE):
        return None
    withheld = film["outcome"] != guard.VERDICT
    reason = film["error"].split(": ", 1)[1] if withheld and ": " in (film["error"] or "") else ""
    band = tuple(film["band"]) if film["band"] else None
    return Prediction(float(film["p_pneumonia"]), film["model_version"], film["outcome"], reason, band)


def analysis_of(spool: Spool, film: dict) -> tuple[Analysis | None, bytes, str]:
    """(Analysis with the recorded result and the spooled image, the object's bytes, '') or (None, b'', why)."""
    if film["cleaned"]:
        return None, b"", ("the film was removed from the node's spool after its results were delivered "
                           "(XRAY_NODE_KEEP_HOURS); open it in the PACS")
    try:
        data = (spool.inbox / film["file"]).read_bytes()
    except OSError as exc:
        return None, b"", f"the spooled film cannot be read: {exc.strerror or exc}"
    prediction = prediction_of(film)
    try:
        image = load_image(data, name=f"{film['sop_uid']}.dcm")
    except ValueError as exc:
        return None, data, " ".join(str(exc).split())
    name = " ".join(part for part in (film["patient_name"], film["accession"]) if part) or film["sop_uid"]
    return Analysis(name, film["sha256"], image, prediction, film["error"] or ""), data, ""
