"""Worklist: the studies the DICOM node (`python -m xray node`) received, newest first or by urgency,
refreshed live, each opening the Diagnose page's detail view with the result the node recorded and sent."""
from __future__ import annotations

import streamlit as st

from pages.common import escape_markdown, require_model
from pages.result_view import report_input_for, result_ui
from xray import settings
from xray.model.registry import LoadedModel, ModelFileError, Registry
from xray.node import triage
from xray.node.spool import Spool
from xray.govern import siteconfig

ORDER_KEY = "worklist_order"
PICK_KEY = "worklist_pick"  # the SOP Instance UID whose detail is open
TABLE_KEY = "worklist_table"
ROWS_KEY = "worklist_rows"  # SOP Instance UIDs in the table's order, as last shown
OPEN_KEY = "worklist_open"  # a row was clicked: rerun the whole page to open it
REFRESH_SECONDS = 5


@st.cache_resource(max_entries=4, show_spinner="Loading the model version that scored this film...")
def version_model(root: str, version: str) -> LoadedModel:
    return Registry(root).load(version)


def model_for(film: dict, active: LoadedModel) -> LoadedModel | None:
    """The version that scored the film (its heatmap and report must be that version's)."""
    if film["model_version"] in (None, active.version):
        return active
    try:
        return version_model(str(Registry().root), film["model_version"])
    except (ModelFileError, ValueError) as exc:
        st.warning(f"Model {escape_markdown(film['model_version'])}, which scored this film, cannot be loaded "
                   f"({escape_markdown(str(exc))}): only the recorded result is shown.", icon=":material/warning:")
        return None


def pick_row() -> None:
    """A click opens the film in the row the clinician saw (the order of the table as shown, even if a
    refresh has reordered it since)."""
    rows = st.session_state.get(TABLE_KEY, {}).get("selection", {}).get("rows", [])
    shown = st.session_state.get(ROWS_KEY, [])
    if rows and rows[0] < len(shown):
        st.session_state[PICK_KEY] = shown[rows[0]]
        st.session_state[OPEN_KEY] = True


@st.fragment(run_every=REFRESH_SECONDS)
def studies(spool: Spool) -> None:
    """The table and the refusals, refreshed every few seconds; a click opens the film below."""
    films = triage.ordered(spool.films(), st.session_state.get(ORDER_KEY, triage.NEWEST))
    refusals = spool.refusals()
    waiting = sum(f["state"] != "delivered" for f in films)
    st.caption(f"{len(films)} film(s) received; {waiting} with results not delivered yet; refreshed every "
               f"{REFRESH_SECONDS} s.")
    if not films:
        st.info("The node has not received any film yet. Send studies to it from the PACS (its AE title, host and "
                "port as `python -m xray node` printed them).", icon=":material/info:")
    else:
        st.session_state[ROWS_KEY] = [f["sop_uid"] for f in films]
        # a dataframe renders cell text literally: names from DICOM headers never reach markdown
        st.dataframe(
            {"Received": [triage.received_text(f) for f in films],
             "Patient": [f["patient_name"] for f in films], "Patient ID": [f["patient_id"] for f in films],
             "Accession": [f["accession"] for f in films], "Decision": [triage.decision_text(f) for f in films],
             "p(pneumonia)": [f["p_pneumonia"] if f["label"] else None for f in films],  # withheld means withheld
             "Results": [triage.delivery_text(f) for f in films], "Reason": [triage.reason_text(f) for f in films],
             "Study date": [f["study_date"] for f in films]},
            hide_index=True, key=TABLE_KEY, on_select=pick_row, selection_mode="single-row",
            column_config={"p(pneumonia)": st.column_config.ProgressColumn("p(pneumonia)", min_value=0.0,
                                                                           max_value=1.0, format="%.3f")})
        if st.session_state.pop(OPEN_KEY, False):
            st.rerun(scope="app")  # the detail view lies outside this fragment
        st.caption("Click a row to open that film below.")
    if refusals:
        with st.expander(f"Refused by the node ({len(refusals)})", expanded=False):
            st.dataframe({"Time": [triage.local_time(r["time"]) for r in refusals],
                          "Calling AE": [r["calling_ae"] for r in refusals],
                          "SOP Instance UID": [r["sop_uid"] for r in refusals],
                          "Reason": [r["reason"] for r in refusals]}, hide_index=True, key="worklist_refusals")


def detail(spool: Spool, film: dict, active: LoadedModel) -> None:
    """The Diagnose page's detail view of one film, at the threshold it was scored at."""
    st.divider()
    st.caption(f"SOP Instance UID {film['sop_uid']}; from {film['calling_ae']}; results: "
               f"{triage.delivery_text(film)}.")
    if film["state"] == "received":
        st.info("This film is waiting to be scored.", icon=":material/hourglass_top:")
        return
    result, data, problem = triage.analysis_of(spool, film)
    if result is None or result.image is None:
        st.error(f"**Not assessed**: {escape_markdown(film['error'] or problem)}", icon=":material/broken_image:")
        if problem and film["error"]:
            st.caption(escape_markdown(problem))
        return
    if result.prediction is None:
        st.error(f"**Not assessed** (unreadable): {escape_markdown(film['error'])}", icon=":material/broken_image:")
        return
    model = model_for(film, active)
    if model is None:
        return
    prevalence = siteconfig.site_prevalence(Registry(), model.card)
    result_ui(model, report_input_for(result, float(film["threshold"]), prevalence, data))  # Diagnose's own view


active = require_model()
st.title("Worklist")
spool = Spool(settings.node_spool_path())
st.caption(f"Films the DICOM node received ({escape_markdown(str(spool.root))}), with the results it sent back to "
           "the PACS. Decision support for pediatric AP chest radiographs: it assists a clinician and does not "
           "diagnose.")
st.radio("Order", [triage.NEWEST, triage.URGENCY], key=ORDER_KEY, horizontal=True,
         help="By urgency: PNEUMONIA, then BORDERLINE, then NORMAL (highest p(pneumonia) first), then films without "
              "a verdict with their reasons")
studies(spool)
pick = st.session_state.get(PICK_KEY)
chosen = next((f for f in spool.films() if f["sop_uid"] == pick), None) if pick else None
if chosen is not None:
    detail(spool, chosen, active)
