"""Training events (xray.train.events): the JSON-lines writer, the reader that tolerates a torn last line,
and the console printer."""
from __future__ import annotations

from xray.io import folders
from xray.train import events as E


def test_the_log_writes_one_line_per_event_and_the_reader_returns_them(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    log = E.EventLog(path)  # creates the folder
    sent = [{"event": E.START, "time": 1.0, "config": {"epochs": 2}},
            {"event": E.EPOCH, "time": 2.0, "epoch": 1, "path": tmp_path}]  # default=str: paths become text
    for event in sent:
        log(event)
    assert path.read_text().count("\n") == 2
    assert E.read_events(path) == [sent[0], {**sent[1], "path": str(tmp_path)}]


def test_a_torn_last_line_and_a_missing_file_are_not_errors(tmp_path):
    path = tmp_path / "events.jsonl"
    assert E.read_events(path) == []
    path.write_text('{"event": "start", "time": 1}\n{"event": "epo')  # the writer was killed mid-line
    assert E.read_events(path) == [{"event": "start", "time": 1}]


def test_names_have_one_owner_and_terminal_events_end_a_run():
    assert (E.SCAN, E.DECODE, E.UNREADABLE) == (folders.SCAN, folders.DECODE, folders.UNREADABLE)
    assert set(E.TERMINAL) == {E.DONE, E.ERROR, E.CANCELLED} and set(E.STOPPING) == {E.EARLY_STOP, E.TIME_LIMIT}
    names = [E.START, E.SCAN, E.DECODE, E.UNREADABLE, E.DATA, E.RESUMED, E.STEP, E.EPOCH, E.EARLY_STOP, E.TIME_LIMIT,
             E.DONE, E.ERROR, E.CANCELLED]
    assert len(set(names)) == len(names)


def test_the_console_printer_says_what_happened(capsys):
    printer = E.ConsolePrinter()
    printer({"event": E.DATA, "train": 10, "val": 4, "test": 0, "validation": "by patient"})
    printer({"event": E.EPOCH, "epoch": 1, "epochs": 3, "train_loss": 0.5, "val_loss": 0.4, "val_auc": 0.9,
             "val_accuracy": 0.8, "seconds": 1.5, "eta_s": 120})
    printer({"event": E.EARLY_STOP, "epoch": 2})
    printer({"event": E.DONE, "version": "v9", "threshold": 0.25, "activated": False, "gate": "too few images",
             "val_metrics": {"n": 4, "roc_auc": 0.9, "sensitivity": 1.0, "specificity": 0.5}})
    err = capsys.readouterr().err
    assert "train 10 / validation 4 (by patient) / test 0" in err
    assert "epoch   1/3  train loss 0.5000  val loss 0.4000  val AUC 0.9000" in err and "ETA 2.0 min" in err
    assert "stopping: early stop at epoch 2" in err
    assert "new version v9 (threshold 0.250000" in err and "python -m xray activate v9" in err
    assert "not activated: too few images" in err
