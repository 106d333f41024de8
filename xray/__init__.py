"""The pneumonia X-ray assistant's engine, in wings that import only downward. Never imports streamlit.

``LAYERS`` is the one declaration of the order (``tests/test_architecture.py`` checks every import
against it, counting imports inside functions; ``python scripts/import_graph.py`` prints the graph):

- ``atomic``, ``clock``, ``settings``: atomic writes, UTC timestamps and every ``XRAY_*`` setting; anything may
  use them.
- ``io``: films in (the one loader incl. DICOM, preprocessing, acquisition augmentation, labelled folders
  and their validation splits).
- ``decide``: metrics, calibration, the decision rule, the borderline band, prevalence.
- ``model``: the network, the typed card, the registry, the guard's feature statistics and its home-vs-outside
  networks, site settings.
- ``serve``: ``predict``, the intended-use guard, HiResCAM evidence maps, one upload's analysis, the batch
  pipeline.
- ``govern``: who acts (sign-in identity and roles), the promotion gate (and its one minimum of an
  acceptance set), the audit log, site calibration, the site's saved threshold and prevalence.
- ``report``: PDF and DICOM results, and the batch of them (``python -m xray report``).
- ``node``: the DICOM node (receive films from the PACS, score them, send results back; spool and queue).
- ``train``: the loop, its config, optimiser, events, background jobs, robustness checks.
- ``cli``, ``bench``, ``__main__``: the command line on top.

A new wing is added here at its place (``docs/architecture.md``, "Where a new feature goes").
"""

# Lowest first. A module may import a module of its own wing (without a cycle) or of any wing listed
# before its own; never one listed after.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("atomic", "clock", "settings"),
    ("io",),
    ("decide",),
    ("model",),
    ("serve",),
    ("govern",),
    ("report",),
    ("node",),
    ("train",),
    ("bench",),
    ("cli", "__main__"),
)
