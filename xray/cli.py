"""Command line: ``python -m xray {predict,evaluate,calibrate,adapt,train,jobs,bench,fit-ood,versions,activate,rollback,node}``.

Argparse and thin commands only: the work is done by the engine's wings (``serve.pipeline``, ``train``,
``model.registry``, ``govern``, ``report.batch``, ``bench``). The top wing: nothing in ``xray/`` imports this module.

The command line is the machine operator's tool: it acts as the OS login with the administrator's rights
(``identity.operator``), without the app's sign-in; its audit lines name that login.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from xray.clock import utc_stamp
from xray.train import events as E
from xray.govern import promotion
from xray.govern import sitecal
from xray.govern.identity import operator
from xray.report import batch
from xray.atomic import atomic_write_json
from xray.bench import add_arguments as bench_arguments
from xray.bench import main as bench_main
from xray.train.jobs import cancel_job, current_job, list_jobs, status_lines
from xray.serve.pipeline import (
    CSV_HEADER,
    csv_row,
    done_paths,
    evaluate_folder,
    iter_shard,
    path_text,
    score_paths,
)
from xray.model.outside_net import OutsideNetConfig
from xray.model.registry import LoadedModel, ModelFileError, Registry
from xray.train import adapt as adaptation
from xray.train.loop import Cancelled, fit_ood_for_version
from xray.train.loop import main as train_main
from xray.train.config import add_arguments, config_from_args
from xray.node import service as node_service


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= i < n")
    return index, count


def _load_model(args) -> LoadedModel:
    registry = Registry(args.registry or None)
    try:
        if args.model:
            return registry.load(args.model)
        model, problems = registry.load_with_fallback()
        for problem in problems:
            print(f"warning: {problem}; using model {model.version}", file=sys.stderr)
        return model
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")


def _prevalence(args, model: LoadedModel) -> float:
    """``--prevalence``, else the site's saved one, else the version's (``SiteSettings.prevalence_in_force``)."""
    try:
        return Registry(args.registry or None).site.prevalence_in_force(model.card.calibration_prevalence,
                                                                         args.prevalence)
    except ValueError:
        raise SystemExit("error: --prevalence must lie strictly between 0 and 1") from None


def cmd_predict(args) -> int:
    if args.resume and not args.csv:
        raise SystemExit("error: --resume needs --csv (the file to continue)")
    done: set[str] = set()
    if args.resume and args.csv and Path(args.csv).is_file() and Path(args.csv).stat().st_size:
        try:
            done = done_paths(Path(args.csv))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {exc}")
    model = _load_model(args)
    try:
        out = open(args.csv, "a" if done else "w", newline="", encoding="utf-8") if args.csv else sys.stdout
    except OSError as exc:
        raise SystemExit(f"error: cannot write {args.csv}: {exc.strerror or exc}")
    writer = csv.writer(out)
    if not done:
        writer.writerow(CSV_HEADER)
    threshold = model.default_threshold if args.threshold is None else float(args.threshold)
    prevalence = (model.card.calibration_prevalence, _prevalence(args, model))
    skipped: list[tuple[str, str]] = []
    paths = (p for p in iter_shard(args.paths, args.shard, skipped) if path_text(p) not in done)
    found = failures = not_xray = 0
    with E.progress_bar(None, "predict") as bar:
        for path, prediction, error in score_paths(model, paths, args.batch_size, args.workers):
            found += 1
            failures += prediction is None
            not_xray += prediction is not None and prediction.withheld
            writer.writerow(csv_row(str(path), prediction, error, threshold, prevalence))
            out.flush()  # a crash loses at most the row being written; --resume continues after it
            bar.update(1)
    if args.csv:
        out.close()
    print(f"{found} image file(s) found and scored or reported" + (f" ({len(done)} already in the CSV)" if done else "")
          + (f"; {len(skipped)} other file(s) skipped:" if skipped else ""), file=sys.stderr)
    for path, reason in skipped:
        print(f"  skipped {path_text(path)}: {reason}", file=sys.stderr)
    if failures:
        print(f"{failures} file(s) could not be scored; see the error column", file=sys.stderr)
    if not_xray:
        print(f"{not_xray} file(s) got no verdict (withheld); see the error column", file=sys.stderr)
    if found == failures and not done:
        where = ", ".join(args.paths)
        raise SystemExit(f"error: nothing readable in {where}: " + (
            f"{found} file(s) could not be read" if found else "no image or DICOM file found")
            + (f", {len(skipped)} skipped (listed above)" if skipped else ""))
    return 0


def cmd_report(args) -> int:
    """PDF reports (and with --dicom, a Secondary Capture and a structured report) per image (``xray.report.batch``)."""
    model = _load_model(args)
    threshold = model.default_threshold if args.threshold is None else float(args.threshold)
    prevalence = _prevalence(args, model)
    skipped: list[tuple[str, str]] = []
    paths = list(iter_shard(args.paths, (0, 1), skipped))
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    if not paths:
        raise SystemExit("error: no image or DICOM file found in " + ", ".join(args.paths))
    try:
        batch.write_reports(model, paths, Path(args.out), threshold, prevalence, args.dicom, args.force,
                            say=lambda line: print(line, file=sys.stderr))
    except batch.ReportsExist as exc:
        raise SystemExit(f"error: {exc}")
    return 0


def cmd_calibrate(args) -> int:
    registry = Registry(args.registry or None)
    try:
        version, result = sitecal.calibrate(registry, args.data_dir, args.model or None, args.rule or None,
                                            args.workers, actor=operator())
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(sitecal.terminal_summary(result), file=sys.stderr)
    for name, why in result.data.unreadable:
        print(f"  unreadable, skipped: {name}: {why}", file=sys.stderr)
    print(f"new version {version} (weights of {result.parent}, unchanged); not active: "
          f"python -m xray activate {version}", file=sys.stderr)
    return 0


def cmd_adapt(args) -> int:
    registry = Registry(args.registry or None)
    try:
        version, result = adaptation.adapt(registry, args.data_dir, args.model or None, actor=operator())
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(adaptation.terminal_summary(result, registry.card(version).threshold), file=sys.stderr)
    for name, why in result.films.unreadable:
        print(f"  unreadable, skipped: {name}: {why}", file=sys.stderr)
    print(f"new version {version} (adapted from {result.parent}); not active, and the gate refuses it until it is "
          f"measured: python -m xray calibrate LABELLED_DIR --model {version}", file=sys.stderr)
    return 0


def _outside_net_progress(epochs: int):
    """fit-ood's progress on stderr: one line per trained network of the guard."""
    def emit(event: dict) -> None:
        if event.get("event") == "outside_net":
            print(event["message"], file=sys.stderr, flush=True)
        elif event.get("event") == "outside_net_epoch" and event["epoch"] == epochs - 1:
            print(f"  network {event['member'] + 1} trained (loss {event['loss']:.3f})", file=sys.stderr, flush=True)
    return emit


def cmd_fit_ood(args) -> int:
    registry = Registry(args.registry or None)
    try:
        net_config = replace(OutsideNetConfig(), members=args.net_members, epochs=args.net_epochs)
        version = fit_ood_for_version(registry, args.model or None, args.data_dir, workers=args.workers,
                                      percentile=args.percentile, outside=args.outside, net_config=net_config,
                                      emit=_outside_net_progress(args.net_epochs))
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.activate:  # through the gate, like every other way to make a version live
        try:
            promotion.promote(registry, version, actor=operator())
        except promotion.PromotionRefused as exc:
            raise SystemExit(f"error: new version {version} saved but not activated: {exc} "
                             f"(python -m xray activate {version} --force --reason '...')")
    ood = registry.card(version).ood
    limit = ood.get("combined_threshold", ood["threshold"])
    print(f"new version {version}: same weights plus OOD statistics (limit {limit:.2f}, "
          f"{ood['val_flagged']:.1%} of validation X-rays flagged)"
          + (" - activated" if args.activate else f"; activate with: python -m xray activate {version}"),
          file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    model = _load_model(args)
    try:
        result = evaluate_folder(model, args.data_dir, args.threshold)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    text = json.dumps(result, indent=2)
    if args.json:
        atomic_write_json(args.json, result)
    print(text)
    return 0


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    registry = Registry(cfg.registry or None)
    if not cfg.run_dir:
        cfg.run_dir = str(registry.root / "runs" / utc_stamp())
    events = Path(args.events) if args.events else Path(cfg.run_dir) / "events.jsonl"
    rank = int(os.environ.get("RANK", 0))  # under torchrun, rank 0 alone reports and writes events
    callbacks = [E.ConsolePrinter(), E.EventLog(events)] if rank == 0 else []
    # other ranks never raise from the signal handler: they stop with rank 0 at an agreed step
    stop = {"asked": False, "training": rank != 0}

    def on_sigterm(signum, frame):  # `python -m xray jobs --cancel` and the Retrain page send SIGTERM
        stop["asked"] = True
        if not stop["training"]:
            raise Cancelled()  # still scanning or decoding: nothing to finish, stop at once

    def note_training(event: dict) -> None:
        stop["training"] = stop["training"] or event["event"] == E.DATA

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        train_main(cfg, callbacks + [note_training], should_stop=lambda: stop["asked"])
    except Cancelled:
        for cb in callbacks[1:]:
            cb({"event": E.CANCELLED, "time": time.time()})
        print("training cancelled; no version written", file=sys.stderr)
        return 3
    except ValueError as exc:
        for cb in callbacks[1:]:
            cb({"event": E.ERROR, "message": str(exc), "time": time.time()})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # record why in the event file too; the traceback still goes to stderr
        for cb in callbacks[1:]:
            cb({"event": E.ERROR, "message": f"{type(exc).__name__}: {exc}", "time": time.time()})
        raise
    return 0


def cmd_jobs(args) -> int:
    root = Registry(args.registry or None).root
    if args.cancel:
        if not cancel_job(root, actor=operator()):
            print("no training job is running", file=sys.stderr)
            return 1
        print("asked the running training job to stop", file=sys.stderr)
        return 0
    jobs = list_jobs(root) if args.all else [j for j in [current_job(root)] if j]
    if not jobs:
        print(f"no training jobs recorded in {root}", file=sys.stderr)
    for job in jobs:
        print(status_lines(job))
    return 0


def cmd_bench(args) -> int:
    return bench_main(args)


def cmd_versions(args) -> int:
    registry = Registry(args.registry or None)
    active = registry.active_version()
    for version in registry.versions():
        try:
            card = registry.card(version)
        except ModelFileError as exc:  # list it, say why, and go on with the others
            print(f"{'*' if version == active else ' '} {version}  unusable: {exc}")
            continue
        auc = card.validation.roc_auc
        print(f"{'*' if version == active else ' '} {version}  AUC {auc if auc is not None else float('nan'):.4f}  "
              f"(n={card.validation.n})  threshold {card.threshold:.6f}  {card.created}")
    return 0


def cmd_activate(args) -> int:
    """Activate through the promotion gate; ``--force --reason`` overrides it (recorded)."""
    registry = Registry(args.registry or None)
    try:
        result = promotion.gate(registry, args.version)
        for name, figure in result.figures.items():
            print(f"  {args.version} {name}: {figure}", file=sys.stderr)
        for name, figure in result.active_figures.items():
            print(f"  active {result.active_version} {name}: {figure}", file=sys.stderr)
        promotion.promote(registry, args.version, force=args.force, reason=args.reason, actor=operator())
    except promotion.PromotionRefused as exc:
        raise SystemExit(f"error: {exc} (python -m xray activate {args.version} --force --reason '...')")
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if not result.passed:
        print(f"warning: activated despite the promotion gate ({'; '.join(result.reasons)}); "
              f"reason recorded: {args.reason}", file=sys.stderr)
    print(f"active model: {args.version}", file=sys.stderr)
    return 0


def cmd_rollback(args) -> int:
    try:
        version = promotion.rollback(Registry(args.registry or None), reason=args.reason, actor=operator())
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"active model: {version}", file=sys.stderr)
    return 0


def cmd_node(args) -> int:
    """Run the DICOM node until SIGTERM or Ctrl-C."""
    try:
        given = {k: v for k, v in dict(
            ae_title=args.ae_title, port=args.port, host=args.host, allowed=args.allow, spool=args.spool,
            max_associations=args.max_associations, spool_mb=args.spool_mb, keep_hours=args.keep_hours,
            retry_max_s=args.retry_max, registry=args.registry or None,
            destination=node_service.parse_destination(args.destination) if args.destination else None).items()
            if v not in (None, [])}
        options = {**node_service.env_defaults(), **given}
        missing = [name for name in ("ae_title", "port", "destination") if name not in options]
        if missing:
            raise ValueError("missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                             + " (or XRAY_NODE_" + ", XRAY_NODE_".join(m.upper() for m in missing) + ")")
        config = node_service.NodeConfig(**options)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    node_service.setup_logging(config.spool)
    node = node_service.Node(config)
    try:
        node.start()
    except (ModelFileError, ValueError, OSError) as exc:
        raise SystemExit(f"error: the node cannot start: {exc}")
    stop = node.stopping
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    node.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xray", description="Pneumonia chest X-ray assistant engine",
        epilog="The command line is the machine operator's tool: it runs as your OS login with the administrator's "
               "rights and without the app's sign-in, and the audit log names that login. People at a screen use the "
               "app, where sign-in and roles apply (README 'Sign-in').")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--model", default="", help="model version id (default: the active one)")
        p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
        p.add_argument("--threshold", type=float, default=None, help="operating threshold (default: the model's own)")

    p = sub.add_parser("predict", help="score image files and folders; CSV out")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    model_options(p)
    p.add_argument("--csv", default="", help="write CSV here instead of stdout")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="score only part I of N (0-based) of the files, split by a hash of each file's path "
                        "relative to its folder argument: N machines with I = 0..N-1 cover every file once")
    p.add_argument("--resume", action="store_true",
                   help="with --csv: skip files already in that CSV and append the rest (same path arguments)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per CPU core)")
    p.add_argument("--prevalence", type=float, default=None,
                   help="pneumonia prevalence at this site, for the p_pneumonia_at_prevalence column (default: the "
                        "site's saved setting, else the version's calibration prevalence); the label never depends on it")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="PDF report per image (and DICOM Secondary Capture + SR with --dicom)")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the reports (created if needed)")
    model_options(p)
    p.add_argument("--prevalence", type=float, default=None,
                   help="site prevalence for the adjusted probability (default: the site's setting, else the version's)")
    p.add_argument("--dicom", action="store_true", help="also write <stem>.sc.dcm and <stem>.sr.dcm")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("calibrate", help="recalibrate a version on a site's labelled folder (new inactive version, same weights)")
    p.add_argument("data_dir", help="folder with NORMAL/ and PNEUMONIA/ at any depth, at least "
                                    f"{promotion.MIN_ACCEPTANCE_IMAGES} images with {promotion.MIN_PER_CLASS} of each class (the promotion gate's minimum)")
    p.add_argument("--model", default="", help="version to recalibrate (default: the active one)")
    p.add_argument("--registry", default="", help="registry folder (default: the site registry, or $XRAY_WEIGHTS)")
    p.add_argument("--rule", default="", help="threshold rule (default: the version's own, a sensitivity floor "
                                               "fitted as lcb-sensitivity>=X: kept on new films with 95%% confidence)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default: automatic)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("adapt", help="adapt a version to a site's unlabelled films (AdaBN; new inactive version)")
    p.add_argument("data_dir", help=f"folder of the site's films at any depth, labels not needed; at least "
                                    f"{adaptation.MIN_FILMS} that the guard accepts")
    p.add_argument("--model", default="", help="version to adapt (default: the active one)")
    p.add_argument("--registry", default="", help="registry folder (default: the site registry, or $XRAY_WEIGHTS)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("evaluate", help="metrics on a labelled folder")
    p.add_argument("data_dir")
    model_options(p)
    p.add_argument("--json", default="", help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a new (inactive) model version")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("jobs", help="the current (or last) background training job, as the Retrain page sees it")
    p.add_argument("--registry", default="")
    p.add_argument("--all", action="store_true", help="every recorded job, newest first")
    p.add_argument("--cancel", action="store_true", help="stop the running job")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("fit-ood", help="add OOD statistics to a version (saved as a new version)")
    p.add_argument("data_dir", help="the folder the model was trained on (its validation split is reproduced)")
    p.add_argument("--model", default="", help="model version id (default: the active one)")
    p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    p.add_argument("--percentile", type=float, default=99.5,
                   help="flag images beyond this percentile of validation distances (default 99.5)")
    p.add_argument("--workers", type=int, default=1, help="image decoding processes (default 1)")
    p.add_argument("--outside", action="append", default=[], metavar="DIR",
                   help="a folder of other hospitals' chest films for the guard's home-vs-outside networks "
                        "(repeatable; docs/ood.md round 4); never used to train the pneumonia classifier")
    p.add_argument("--net-members", type=int, default=OutsideNetConfig().members,
                   help=f"home-vs-outside networks, scores averaged (default {OutsideNetConfig().members})")
    p.add_argument("--net-epochs", type=int, default=OutsideNetConfig().epochs,
                   help=f"training passes of each (default {OutsideNetConfig().epochs})")
    p.add_argument("--activate", action="store_true", help="activate the new version (through the promotion gate)")
    p.set_defaults(func=cmd_fit_ood)

    p = sub.add_parser("bench", help="training and inference speed, against a reference network and the machine")
    bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("versions", help="list model versions (* = active)")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("activate", help="make a version the active model (through the promotion gate)")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="activate even when the promotion gate refuses (needs --reason)")
    p.add_argument("--reason", default="", help="why the gate is overridden; recorded in the marker, card and audit log")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("rollback", help="re-activate the previously active version (recorded in the audit log)")
    p.add_argument("--reason", default="", help="why; recorded in the audit log")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("node", help="a DICOM node: receive films from the PACS, send results (SR, SC) back")
    p.add_argument("--ae-title", default=None, help="this node's AE title ($XRAY_NODE_AE_TITLE)")
    p.add_argument("--port", type=int, default=None, help="port to listen on ($XRAY_NODE_PORT)")
    p.add_argument("--destination", default=None, metavar="AET@HOST:PORT",
                   help="where results go, usually the PACS that sends the films ($XRAY_NODE_DESTINATION)")
    p.add_argument("--allow", action="append", default=None, metavar="AET",
                   help="a calling AE title to accept (repeat; default: the destination's; $XRAY_NODE_ALLOW)")
    p.add_argument("--host", default=None, help="address to listen on (default 0.0.0.0; $XRAY_NODE_HOST)")
    p.add_argument("--spool", default=None, help="spool and queue folder (default <user data folder>/node)")
    p.add_argument("--max-associations", type=int, default=None, help="concurrent associations (default 4)")
    p.add_argument("--spool-mb", type=float, default=None, help="spool size limit in MB (default 2048)")
    p.add_argument("--keep-hours", type=float, default=None,
                   help="hours a delivered film stays in the spool for the Worklist (default 24; 0: delete at once)")
    p.add_argument("--retry-max", type=float, default=None,
                   help="longest wait between delivery tries, seconds (default 300; tries back off from 2 s)")
    p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    p.set_defaults(func=cmd_node)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
