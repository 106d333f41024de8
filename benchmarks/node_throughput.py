"""Films per second through the DICOM node, against the PACS alone, in one run (the ratio is the figure).

    .venv/bin/python benchmarks/node_throughput.py [--films 48] [--registry weights] [--images DIR ...]

Starts a private Orthanc (Debian's ``orthanc``) and ``python -m xray node`` on free loopback ports, then
for 1 and 4 concurrent associations (``storescu`` processes, films split between them):
- direct: ``storescu`` straight into Orthanc, until every film is stored;
- node: ``storescu`` into the node, until every film's SR is stored in Orthanc (scored, SR and SC built,
  delivered), and the time from the last film's C-STORE (storescu's end) to its SR in Orthanc.
Films are the images given (default: ``samples/`` and ``tests/fixtures/fullres``, full-resolution
JPEGs) wrapped as uncompressed 8-bit DX objects, each with new UIDs, cycled to ``--films``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_films(images: list[Path], count: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    pixels = [np.asarray(Image.open(p).convert("L")) for p in images]
    out = []
    for i in range(count):
        array = pixels[i % len(pixels)]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientAge = "DX", f"Bench^{i:04d}", f"B{i:04d}", "003Y"
        ds.ViewPosition, ds.BodyPartExamined, ds.StudyDate, ds.StudyTime = "AP", "CHEST", "20261201", "120000"
        ds.AccessionNumber = ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.Rows, ds.Columns = array.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored = 1, "MONOCHROME2", 8, 8
        ds.HighBit, ds.PixelRepresentation, ds.PixelData = 7, 0, array.tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


class Pacs:
    def __init__(self, folder: Path):
        self.dicom, self.http = free_port(), free_port()
        folder.mkdir(parents=True)
        config = {"Name": "bench", "StorageDirectory": str(folder), "IndexDirectory": str(folder), "DicomAet": "ORTHANC",
                  "DicomPort": self.dicom, "HttpPort": self.http, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "Plugins": [], "DicomAlwaysAllowStore": True}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        until(lambda: self.get("/system"), 30)

    def get(self, path: str, body=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def instances(self) -> int:
        return self.get("/statistics")["CountInstances"]

    def sr_of(self, study_uid: str) -> bool:
        return bool(self.get("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid,
                                                                          "Modality": "SR"}}))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def until(check, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s")


def send(port: int, called: str, films: list[Path], associations: int) -> float:
    """``associations`` storescu processes in parallel, the films split between them; returns when all end."""
    parts = [films[i::associations] for i in range(associations)]
    senders = [subprocess.Popen(["storescu", "-R", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
                                 *map(str, part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for part in parts]
    for sender in senders:
        if sender.wait() != 0:
            raise SystemExit(f"storescu failed: {sender.stderr.read().decode()[-500:]}")
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=48)
    parser.add_argument("--registry", default="", help="a model registry (default: the shipped model's)")
    parser.add_argument("--images", nargs="*", default=[str(ROOT / "samples"), str(ROOT / "tests/fixtures/fullres")])
    args = parser.parse_args()
    images = sorted(p for d in args.images for p in Path(d).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    work = Path(tempfile.mkdtemp(prefix="node-bench-"))
    pacs = Pacs(work / "orthanc")
    node_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XRAY_DATA": str(work / "data"), "XRAY_AUDIT_LOG": str(work / "audit.jsonl"),
           **({"XRAY_WEIGHTS": args.registry} if args.registry else {})}
    node = subprocess.Popen([sys.executable, "-m", "xray", "node", "--ae-title", "XRAYNODE", "--port", str(node_port),
                             "--host", "127.0.0.1", "--destination", f"ORTHANC@127.0.0.1:{pacs.dicom}",
                             "--allow", "MODALITY", "--spool", str(work / "spool"), "--keep-hours", "0",
                             "--max-associations", "4"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / "node.log", "w"))
    try:
        until(lambda: subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "XRAYNODE", "127.0.0.1", str(node_port)],
                                     capture_output=True).returncode == 0, 180, every=0.5)
        warm = make_films(images, 2, work / "warm")  # the first film loads the model's lazy parts
        send(node_port, "XRAYNODE", warm, 1)
        until(lambda: pacs.get("/tools/find", {"Level": "Series", "Query": {"Modality": "SR"}}), 120)
        rows = []
        megapixels = np.mean([np.prod(Image.open(p).size) for p in images]) / 1e6
        for associations in (1, 4):
            films = make_films(images, args.films, work / f"direct-{associations}")
            before = pacs.instances()
            start = time.monotonic()
            send(pacs.dicom, "ORTHANC", films, associations)
            until(lambda: pacs.instances() >= before + len(films), 300)
            direct = len(films) / (time.monotonic() - start)

            films = make_films(images, args.films, work / f"node-{associations}")
            studies = [study_of(p) for p in films]
            start = time.monotonic()
            last_ack = send(node_port, "XRAYNODE", films, associations)
            until(lambda: pacs.sr_of(studies[-1]), 600)
            last_sr = time.monotonic() - last_ack
            until(lambda: all(pacs.sr_of(s) for s in studies), 600, every=0.2)
            through = len(films) / (time.monotonic() - start)
            rows.append((associations, direct, through, last_sr))
        print(f"{args.films} films ({len(images)} images cycled, mean {megapixels:.2f} megapixels, uncompressed 8-bit DX), "
              f"model registry {args.registry or 'shipped'}, {os.cpu_count()} CPU cores")
        print(f"{'associations':>12} {'direct films/s':>15} {'node films/s':>13} {'ratio':>6} {'last C-STORE -> SR s':>21}")
        for associations, direct, through, last_sr in rows:
            print(f"{associations:>12} {direct:>15.2f} {through:>13.2f} {through / direct:>6.3f} {last_sr:>21.2f}")
    finally:
        node.terminate()
        node.wait(60)
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


if __name__ == "__main__":
    main()
