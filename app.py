"""Pneumonia chest X-ray assistant: `streamlit run app.py` opens the Diagnose page with the shipped model."""
from pathlib import Path

import streamlit as st

from pages.common import current_actor, identity_sidebar, refuse_unsafe_serving

HERE = Path(__file__).resolve().parent
PAGES = [("pages/diagnose.py", "Diagnose", ":material/radiology:"),
         ("pages/worklist.py", "Worklist", ":material/format_list_numbered:"),
         ("pages/retrain.py", "Retrain", ":material/model_training:"),
         ("pages/models.py", "Models", ":material/inventory_2:"),
         ("pages/about.py", "About", ":material/info:")]
ADMINISTRATOR_PAGES = {"pages/retrain.py"}  # not offered to clinicians (the engine refuses their actions anyway)

# The tab's icon is an emoji (drawn by the browser itself): a :material/...: page icon makes every browser fetch it
# from fonts.gstatic.com, a request to Google from a clinical screen (and one that fails on an offline network).
st.set_page_config(page_title="Pneumonia X-ray assistant", page_icon="🩻", layout="wide")
refuse_unsafe_serving()  # a non-loopback address without sign-in: refused before any page (README "Sign-in")
actor = current_actor(in_app=True)  # nobody known: the sign-in page, and nothing else

paths = [path for path, _, _ in PAGES if (HERE / path).is_file()
         and (path not in ADMINISTRATOR_PAGES or actor.may("administrator"))]
pages = [st.Page(path, title=title, icon=icon, default=path == "pages/diagnose.py")
         for path, title, icon in PAGES if path in paths]

st.session_state["app_navigation"] = True  # see pages/common.py ensure_app_navigation
# The page list is drawn here, not by st.navigation: .streamlit/config.toml sets showSidebarNavigation = false so
# that a fresh server's first run (Streamlit's legacy pages/ mode, which would list every file in pages/,
# "app" and "common" included, until this line runs) lists nothing; that setting hides st.navigation's own
# sidebar list too, so the same links are drawn as page links.
current = st.navigation(pages, position="hidden")
with st.sidebar:
    for page in pages:
        st.page_link(page)
identity_sidebar(actor)
asked = st.session_state.pop("app_return_to", None)  # a bookmark answered in legacy mode: open that page
if asked in paths and Path(asked).stem != current.url_path and not (asked == "pages/diagnose.py" and current.url_path == ""):
    st.switch_page(asked)
current.run()
