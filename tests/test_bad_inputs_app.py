"""The bad-input corpus dropped on the Diagnose page at once (AppTest, the same path as
tests/test_page_diagnose.py): each bad file gets its own one-line message, the others their results."""
from __future__ import annotations

import hashlib
from pathlib import Path

from test_bad_inputs import BAD, EXPECTED
from test_page_diagnose import drop, start_app, upload


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_whole_corpus_dropped_at_once(tiny_registry):
    root = Path(__file__).resolve().parent.parent
    registry_before, samples_before = _snapshot(tiny_registry), _snapshot(root / "samples")
    names = sorted(EXPECTED)
    assert len({hashlib.sha256((BAD / n).read_bytes()).hexdigest() for n in names}) == len(names)  # no dedup
    at = drop(start_app(), *[upload(BAD / name, mime="application/octet-stream") for name in names])

    bad = [n for n in names if EXPECTED[n] is not None]
    assert len(at.error) == len(bad)  # one message per bad file, none for the good ones
    for message in at.error:
        assert "\n" not in message.value.replace("  \n", "")
    table = next(d.value for d in at.dataframe if "Decision" in d.value.columns)
    rows = {name: (decision, note) for name, decision, note in zip(table["File"], table["Decision"], table["Reason"])}
    assert set(rows) == set(names)  # every file listed, names exactly as uploaded (unicode, shell characters)
    for name in names:
        decision, note = rows[name]
        if EXPECTED[name] is None:  # valid: scored, with a verdict or a plain "outside intended use"
            assert decision in ("PNEUMONIA", "NORMAL", "BORDERLINE", "No verdict"), (name, decision)
        else:
            assert decision == "Unreadable"
            assert all(word in note for word in EXPECTED[name]), (name, note)
    # nothing written where the app reads: the registry and the bundled samples are untouched
    assert _snapshot(tiny_registry) == registry_before
    assert _snapshot(root / "samples") == samples_before
