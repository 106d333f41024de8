"""Pneumonia chest X-ray assistant: `streamlit run app.py` opens the Diagnose page with the shipped model."""
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Pneumonia X-ray assistant", page_icon=":material/radiology:", layout="wide")

pages = [st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True)]
# Retrain and Models are separate pages; the navigation lists them once they exist.
for path, title, icon in (("pages/retrain.py", "Retrain", ":material/model_training:"),
                          ("pages/models.py", "Models", ":material/inventory_2:")):
    if (HERE / path).is_file():
        pages.append(st.Page(path, title=title, icon=icon))
pages.append(st.Page("pages/about.py", title="About", icon=":material/info:"))

st.session_state["app_navigation"] = True  # see pages/common.py ensure_app_navigation
st.navigation(pages).run()
