"""The DICOM node against a real PACS: Debian's Orthanc (started here on loopback ports with a generated
configuration) routes studies to ``python -m xray node`` and receives its results; dcmtk's ``storescu``
and ``echoscu`` play the modality. Every SR read back from Orthanc is checked against
``python -m xray predict`` on the same files."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from browser import free_port
from conftest import DATASET

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DX, CR, SC = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.7"
FINDING = {"PNEUMONIA": "Present", "NORMAL": "Absent", "BORDERLINE": "Indeterminate"}
NODE_AET, PACS_AET, MODALITY_AET = "XRAYNODE", "ORTHANC", "MODALITY"
PROBABILITY = "122157"  # DCM "Probability": p(pneumonia) in the SR

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (Path(ORTHANC).exists() and shutil.which("storescu") and shutil.which("echoscu")),
    reason="Debian's orthanc and dcmtk are not installed (.ci/run installs them)")]


# -- a real PACS ------------------------------------------------------------------------------------
class Orthanc:
    """One Orthanc server on free loopback ports, its own storage, the node as a modality."""

    def __init__(self, folder: Path):
        self.folder, self.dicom_port, self.http_port = folder, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self.modalities: dict = {}

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "test-pacs", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
                  "DicomAet": PACS_AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
                  "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "DicomModalities": self.modalities,
                  "HttpTimeout": 60}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(), 30, "Orthanc did not start")
        return self

    def _up(self) -> bool:
        assert self.process.poll() is None, (self.folder / "orthanc.log").read_text()[-2000:]
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
            self.log.close()

    def request(self, method: str, path: str, body=None, raw: bool = False):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str, raw: bool = False):
        return self.request("GET", path, raw=raw)

    def add_node(self, port: int) -> None:
        self.modalities["xraynode"] = [NODE_AET, "127.0.0.1", port]  # kept over a restart
        self.request("PUT", "/modalities/xraynode", {"AET": NODE_AET, "Host": "127.0.0.1", "Port": port})

    def instance_id(self, sop_uid: str) -> str:
        found = self.request("POST", "/tools/lookup", sop_uid)  # Orthanc REST: the resource of a DICOM UID
        return next(f["ID"] for f in found if f["Type"] == "Instance")

    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file", raw=True)))
                for i in self.get("/instances")]

    def results(self) -> dict[str, list[Dataset]]:
        """The node's results in the PACS by study (each test film is a study of its own): {study UID: [...]}."""
        out: dict[str, list[Dataset]] = {}
        for ds in self.datasets():
            if str(ds.get("Manufacturer", "")) == "Pneumonia X-ray assistant":
                out.setdefault(ds.StudyInstanceUID, []).append(ds)
        return out


def srs(results: list[Dataset]) -> list[Dataset]:
    return [d for d in results if d.Modality == "SR"]


def evidence_uid(sr: Dataset) -> str:
    series = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def wait_for(check, timeout: float, message: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"{message} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def pacs(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


# -- films and a model -------------------------------------------------------------------------------
def make_film(path: Path, jpeg: Path, age: str = "003Y", sop_class: str = DX, modality: str = "DX",
              name: str = "Test^Child", accession: str = "ACC1", truncate: bool = False,
              study_uid: str | None = None) -> Dataset:
    """A real radiograph from the fixture JPEGs as a DICOM object in a study of its own; returns it."""
    pixels = np.asarray(Image.open(jpeg).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.AccessionNumber = modality, name, f"ID-{name[-3:]}", accession
    ds.PatientAge, ds.StudyDate, ds.StudyTime, ds.BodyPartExamined = age, "20261201", "101500", "CHEST"
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.StudyID = ""
    if sop_class != SC:
        ds.ViewPosition = "AP"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    data = pixels.tobytes()
    ds.PixelData = data[: len(data) // 2] if truncate else data  # a transfer cut short, re-wrapped whole
    ds.save_as(path, enforce_file_format=True)
    return ds


def jpegs() -> list[Path]:
    return sorted((DATASET / "NORMAL").glob("*.jpeg"))[:4] + sorted((DATASET / "PNEUMONIA").glob("*.jpeg"))[:4]


@pytest.fixture(scope="module")
def registry(tiny_registry_template, tmp_path_factory) -> Path:
    """The tiny model with a borderline band set so that the film nearest the threshold is BORDERLINE."""
    from xray.io.loader import load_image
    from xray.model.registry import Registry
    from xray.serve.inference import predict

    root = tmp_path_factory.mktemp("node-registry") / "weights"
    shutil.copytree(tiny_registry_template, root)
    model = Registry(root).load()
    t = model.default_threshold
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    films = [root.parent / f"{i}.dcm" for i in range(len(jpegs()))]  # scored as the node will see them
    for film, jpeg in zip(films, jpegs()):
        make_film(film, jpeg)
    distances = sorted({abs(logit(min(max(p.p_pneumonia, 1e-6), 1 - 1e-6)) - logit(t))
                        for p in predict(model, [load_image(path) for path in films])})
    band = (distances[0] + distances[1]) / 2  # the nearest film inside, the others outside
    Registry(root).update_card(model.version, {"borderline": {"below": band, "above": band}})
    return root


def node_env(registry: Path, home: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "XRAY_WEIGHTS": str(registry), "XRAY_DATA": str(home / "data"),
            "XRAY_AUDIT_LOG": str(home / "audit.jsonl"), "XRAY_CACHE": str(home / "cache")}


class Node:
    """``python -m xray node`` as a process (the product's command, not an in-process stand-in)."""

    def __init__(self, registry: Path, home: Path, destination_port: int, port: int | None = None):
        self.registry, self.home, self.destination_port = registry, home, destination_port
        self.port, self.spool = port or free_port(), home / "spool"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Node":
        self.home.mkdir(parents=True, exist_ok=True)
        self.out = open(self.home / "stdout.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xray", "node", "--ae-title", NODE_AET, "--port", str(self.port), "--host",
             "127.0.0.1", "--destination", f"{PACS_AET}@127.0.0.1:{self.destination_port}", "--allow", PACS_AET,
             "--allow", MODALITY_AET, "--spool", str(self.spool), "--keep-hours", "0", "--retry-max", "2"],
            cwd=ROOT, env=node_env(self.registry, self.home), stdout=self.out, stderr=subprocess.STDOUT)
        wait_for(self._answers, 90, "the node did not answer C-ECHO", every=0.5)
        return self

    def _answers(self) -> bool:
        assert self.process.poll() is None, self.log()[-3000:]
        return echo(self.port, PACS_AET).returncode == 0

    def log(self) -> str:
        path = self.spool / "node.log"
        return path.read_text() if path.exists() else (self.home / "stdout.log").read_text()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.out.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.out.close()

    def queue(self):
        from xray.node.spool import Spool

        return Spool(self.spool)


def echo(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", NODE_AET, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def storescu(port: int, files: list[Path], calling: str = MODALITY_AET, called: str = NODE_AET,
             options: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)],
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def node(registry, pacs, tmp_path_factory):
    running = Node(registry, tmp_path_factory.mktemp("node"), pacs.dicom_port).start()
    pacs.add_node(running.port)
    yield running
    running.stop()


def predicted(registry: Path, folder: Path, home: Path) -> dict[str, list[str]]:
    """``python -m xray predict`` on the same files (its ``main``, in this process: torch is loaded once):
    {file name: CSV row}."""
    from xray.cli import main

    out = home / "predict.csv"
    assert main(["predict", str(folder), "--csv", str(out), "--registry", str(registry), "--workers", "1"]) == 0
    rows = list(csv.reader(open(out)))[1:]
    return {Path(row[0]).name: row for row in rows}


def sr_finding(sr: Dataset) -> tuple[str | None, str]:
    """(Present / Absent / Indeterminate or None, the comment) read from an SR's content tree."""
    finding, comments = None, []

    def walk(items):
        nonlocal finding
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Pneumonia" and "ConceptCodeSequence" in item:
                finding = str(item.ConceptCodeSequence[0].CodeMeaning)
            if name == "Comment":
                comments.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return finding, " ".join(comments)


def concept_codes(sr: Dataset) -> set[str]:
    """Every concept name's code value in an SR's content tree."""
    out: set[str] = set()

    def walk(items):
        for item in items:
            out.update(str(c.CodeValue) for c in item.get("ConceptNameCodeSequence", []))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


# -- the cases ---------------------------------------------------------------------------------------
def test_echo_and_an_unknown_caller_is_rejected_at_association_and_logged(node, pacs):
    assert echo(node.port, PACS_AET).returncode == 0
    assert pacs.request("POST", "/modalities/xraynode/echo", {}) == {}  # the PACS verifies the node itself
    stranger = echo(node.port, "STRANGER")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
    refusal = wait_for(lambda: [r for r in node.queue().refusals() if r["calling_ae"] == "STRANGER"], 10,
                       "no refusal recorded")
    assert "unknown calling AE title 'STRANGER'" in refusal[0]["reason"]
    assert "unknown calling AE title 'STRANGER'" in node.log()


def test_films_routed_by_the_pacs_get_exactly_one_result_each_as_predict_says(node, pacs, registry, tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    sources = {}
    for i, jpeg in enumerate(jpegs()):
        sop_class, modality = (CR, "CR") if i == 1 else (DX, "DX")
        sources[f"child{i}.dcm"] = make_film(films / f"child{i}.dcm", jpeg, sop_class=sop_class, modality=modality,
                                             name=f"Test^Child^{i:03d}", accession=f"ACC{i}")
    sources["adult.dcm"] = make_film(films / "adult.dcm", jpegs()[0], age="045Y", name="Test^Adult^100")
    sources["digitised.dcm"] = make_film(films / "digitised.dcm", jpegs()[5], sop_class=SC, modality="OT",
                                         name="Test^Film^101")
    sent = storescu(pacs.dicom_port, sorted(films.iterdir()), calling=MODALITY_AET, called=PACS_AET)
    assert sent.returncode == 0, sent.stderr  # the modality stores the study in the PACS
    ids = [pacs.instance_id(ds.SOPInstanceUID) for ds in sources.values()]
    pacs.request("POST", "/modalities/xraynode/store", {"Resources": ids, "Synchronous": True})  # the PACS routes

    expected = predicted(registry, films, tmp_path)
    results = wait_for(lambda: (r := pacs.results()) and all(
        len(srs(r.get(ds.StudyInstanceUID, []))) == 1 and len(r[ds.StudyInstanceUID]) == (2 if expected[name][2] else 1)
        for name, ds in sources.items()) and r, 60, "not every film's results reached the PACS")
    labels = set()
    for name, source in sources.items():
        row, found = expected[name], results[source.StudyInstanceUID]
        (sr,) = srs(found)
        finding, comment = sr_finding(sr)
        assert evidence_uid(sr) == source.SOPInstanceUID and sr.PatientName == source.PatientName
        if row[2]:  # a verdict: the same finding as the CSV's label, and the evidence map in the same study
            assert finding == FINDING[row[2]] and PROBABILITY in concept_codes(sr), (name, row, comment)
            assert len(found) == 2 and {d.Modality for d in found} == {"SR", "OT"}
            labels.add(row[2])
        else:  # no verdict: 'not assessed' and the guard's reason, as the CSV's error column
            assert finding is None and "Pneumonia not assessed" in comment, comment
            assert PROBABILITY not in concept_codes(sr)  # withheld means withheld: no p(pneumonia)
            assert row[4].split(": ", 1)[1][:60] in comment, (row, comment)
    assert "BORDERLINE" in labels and len(labels) >= 2, labels
    assert "years old" in expected["adult.dcm"][4]  # the adult, by its header
    # the PACS holds the results a moment before the node marks the films delivered (it does so once the
    # C-STORE has returned), so wait for the marks rather than read the queue at once
    queued = wait_for(lambda: (q := {f["sop_uid"]: f for f in node.queue().films()}) and all(
        q.get(ds.SOPInstanceUID, {}).get("state") == "delivered" for ds in sources.values()) and q, 30,
        "not every film was marked delivered")
    for name, ds in sources.items():
        film = queued[ds.SOPInstanceUID]
        row = film["csv_row"]  # the same CSV row (the score to float rounding: batches differ)
        assert film["state"] == "delivered" and row[2:6] == expected[name][2:6], (row, expected[name])
        assert not row[1] or abs(float(row[1]) - float(expected[name][1])) < 1e-5, (row, expected[name])
    child = queued[sources["child0.dcm"].SOPInstanceUID]
    assert (child["patient_name"], child["patient_id"], child["accession"]) == ("Test^Child^000", "ID-000", "ACC0")
    # cleaned (keep-hours 0): the received objects go at the end of the delivery pass, just after the last film of
    # the pass is marked delivered, so the check waits for that pass to finish
    wait_for(lambda: not list((node.spool / "in").iterdir()) and not list((node.spool / "out").iterdir()), 30,
             "the spool was not cleaned after delivery")

    # the PACS sends the same films again: acknowledged, no second result
    pacs.request("POST", "/modalities/xraynode/store", {"Resources": ids, "Synchronous": True})
    time.sleep(2)
    again = pacs.results()
    assert all(len(again[ds.StudyInstanceUID]) == len(results[ds.StudyInstanceUID]) for ds in sources.values())
    uids = {ds.SOPInstanceUID for ds in sources.values()}
    assert len([f for f in node.queue().films() if f["sop_uid"] in uids]) == len(uids)
    audit = (node.home / "audit.jsonl").read_text()
    assert audit.count('"shown_in":"report"') >= sum(1 for row in expected.values() if row[1])


def test_damaged_objects_are_refused_with_a_reason_and_the_node_keeps_serving(node, tmp_path):
    cut_pixels = tmp_path / "cut-pixels.dcm"
    uid = make_film(cut_pixels, jpegs()[0], truncate=True).SOPInstanceUID
    sent = storescu(node.port, [cut_pixels])
    assert "A900" in (sent.stdout + sent.stderr).upper() or sent.returncode != 0, sent.stderr
    reasons = wait_for(lambda: [r["reason"] for r in node.queue().refusals() if r["sop_uid"] == uid], 10,
                       "the truncated object's refusal was not recorded")
    assert "pixel data is truncated" in reasons[0] and "pixel data is truncated" in node.log()
    cut_file = tmp_path / "cut-file.dcm"
    make_film(cut_file, jpegs()[1])
    cut_file.write_bytes(cut_file.read_bytes()[:-20_000])  # the file itself ends early: storescu aborts
    assert storescu(node.port, [cut_file]).returncode != 0
    wait_for(lambda: any("aborted" in r["reason"] for r in node.queue().refusals()), 10, "the abort was not logged")
    broken = tmp_path / "broken-jpeg.dcm"  # parses, but its JPEG data cannot be decoded: 'not assessed'
    make_film(broken, jpegs()[2])
    ds = pydicom.dcmread(broken)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(broken, enforce_file_format=True)
    sent = storescu(node.port, [broken], options=("-xy", "-R"))  # offering JPEG Baseline
    assert sent.returncode == 0, sent.stderr
    film = wait_for(lambda: [f for f in node.queue().films() if f["sop_uid"] == ds.SOPInstanceUID
                             and f["state"] == "delivered"], 30, "the undecodable film got no result")[0]
    assert film["outcome"] == "unreadable" and "decoding the DICOM pixel data" in film["error"]
    assert echo(node.port, PACS_AET).returncode == 0  # still serving


def test_results_wait_while_the_destination_is_down_and_arrive_when_it_is_back(node, pacs, tmp_path):
    pacs.stop()  # the PACS goes down
    try:
        films = tmp_path / "films"
        films.mkdir()
        batch = [make_film(films / f"d{i}.dcm", jpegs()[i], name=f"Test^Wait^{i:03d}") for i in range(3)]
        uids = {ds.SOPInstanceUID for ds in batch}
        assert storescu(node.port, sorted(films.iterdir())).returncode == 0  # the modality sends to the node
        waiting = wait_for(lambda: [f for f in node.queue().films() if f["sop_uid"] in uids and f["attempts"] >= 2],
                           60, "no delivery was tried twice")
        assert all(f["state"] == "scored" and "unreachable" in f["last_error"] for f in waiting)
        assert "not delivered" in node.log()
    finally:
        pacs.start()  # back, on the same ports with the same storage
    results = wait_for(lambda: (r := pacs.results()) and all(srs(r.get(ds.StudyInstanceUID, [])) for ds in batch) and r, 60,
                       "the results did not arrive once the destination was back")
    assert all(len(srs(results[ds.StudyInstanceUID])) == 1 for ds in batch)
    wait_for(lambda: all(f["state"] == "delivered" for f in node.queue().films() if f["sop_uid"] in uids), 20,
             "undelivered films")


def test_kill_9_mid_batch_then_a_resend_gives_every_film_exactly_one_result(node, pacs, tmp_path):
    films = tmp_path / "batch"
    films.mkdir()
    batch = [make_film(films / f"f{i:02d}.dcm", jpegs()[i % 8], name=f"Test^Batch^{i:03d}") for i in range(12)]
    uids = {ds.SOPInstanceUID for ds in batch}
    before = {f["sop_uid"] for f in node.queue().films()}
    sender = subprocess.Popen(["storescu", "-aet", MODALITY_AET, "-aec", NODE_AET, "127.0.0.1", str(node.port),
                               *map(str, sorted(films.iterdir()))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len({f["sop_uid"] for f in node.queue().films()} & uids) >= 3, 60, "the node acknowledged nothing")
    node.kill()  # in the middle: some films acknowledged, some scored or delivered, the rest not sent
    sender.wait(30)
    acknowledged = {f["sop_uid"] for f in node.queue().films()} - before
    assert 3 <= len(acknowledged) <= 12
    node.start()
    assert storescu(node.port, sorted(films.iterdir())).returncode == 0  # the modality sends the batch again
    results = wait_for(lambda: (r := pacs.results()) and all(srs(r.get(ds.StudyInstanceUID, [])) for ds in batch) and r, 60,
                       "not every film's result reached the PACS after the restart")
    for ds in batch:
        assert len(srs(results[ds.StudyInstanceUID])) == 1, ds.SOPInstanceUID
    assert len([f for f in node.queue().films() if f["sop_uid"] in uids]) == len(uids)
    wait_for(lambda: all(f["state"] == "delivered" for f in node.queue().films() if f["sop_uid"] in uids), 30,
             "undelivered films")


def test_a_full_spool_an_unsupported_sop_class_and_too_many_associations_are_refused_with_reasons(tiny_registry, tmp_path):
    """The node in this process (the same ``Node`` the command runs): tiny limits, real associations."""
    from xray.node.service import Node as Service
    from xray.node.service import NodeConfig, parse_destination

    config = NodeConfig(ae_title=NODE_AET, port=free_port(), host="127.0.0.1", allowed=[MODALITY_AET],
                        destination=parse_destination(f"{PACS_AET}@127.0.0.1:{free_port()}"), spool=tmp_path / "spool",
                        spool_mb=0.01, registry=str(tiny_registry), max_associations=1)
    service = Service(config)
    service.start()
    try:
        film = tmp_path / "film.dcm"
        uid = make_film(film, jpegs()[0]).SOPInstanceUID  # 50 kB: over a 10 kB spool
        sent = storescu(config.port, [film])
        assert "A700" in (sent.stdout + sent.stderr).upper() or sent.returncode != 0
        (reason,) = [r["reason"] for r in service.spool.refusals() if r["sop_uid"] == uid]
        assert reason.startswith("spool full") and not service.spool.films()
        ct = tmp_path / "ct.dcm"
        ds = make_film(ct, jpegs()[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.save_as(ct, enforce_file_format=True)
        assert storescu(config.port, [ct], options=("-R",)).returncode != 0
        reasons = wait_for(lambda: [r["reason"] for r in service.spool.refusals() if "SOP class" in r["reason"]], 10,
                           "the unsupported SOP class was not recorded")
        assert "1.2.840.10008.5.1.4.1.1.2" in reasons[0] and "not supported" in reasons[0]
        assert echo(config.port, MODALITY_AET).returncode == 0
        from pynetdicom import AE

        caller = AE(ae_title=MODALITY_AET)
        caller.add_requested_context("1.2.840.10008.1.1")
        # the one association allowed (once the echo's has ended on the node's side too)
        held = wait_for(lambda: (a := caller.associate("127.0.0.1", config.port, ae_title=NODE_AET)).is_established
                        and a, 20, "no association")
        try:
            busy = echo(config.port, MODALITY_AET)
            assert busy.returncode != 0 and "Local Limit Exceeded" in busy.stderr, busy.stderr
        finally:
            held.release()
        wait_for(lambda: any(r["reason"].startswith("association limit reached (1 at once)")
                             for r in service.spool.refusals()), 10, "the association limit's refusal was not recorded")
        assert echo(config.port, MODALITY_AET).returncode == 0
    finally:
        service.stop()
