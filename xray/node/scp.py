"""The node's receiving side: a pynetdicom application entity offering Verification (C-ECHO) and Storage
(C-STORE) of the radiograph SOP classes, whose C-STORE handler only spools and queues.

PS3.4 B.2.3 statuses: 0x0000 Success (also for a SOP Instance UID already received: one result per
UID), 0xA700 Out of Resources (spool full), 0xA900 Data Set does not match SOP Class (damaged or not
an image), 0xC000 Cannot understand (unreadable). Every refusal, including those at association
(unknown calling AE title, too many associations) and of presentation contexts (unsupported SOP
class or transfer syntax), is logged and recorded with its reason in the queue's ``refusals``.
"""
from __future__ import annotations

import io
import logging
import threading

from xray.atomic import atomic_write_bytes
from xray.model.registry import sha256_bytes
from xray.node.spool import Received, Spool

LOG = logging.getLogger("xray.node")
VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A: the Verification SOP class (C-ECHO)

# PS3.4 B.5: the radiograph storage SOP classes (CR, DX for presentation and for processing) and
# Secondary Capture as film digitisers send it
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# PS3.5 A/A.4: the transfer syntaxes xray.io.loader decodes (pydicom and its pylibjpeg plugins)
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old equipment)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
UNCOMPRESSED = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def _text(ds, key: str) -> str:
    try:
        return str(ds.get(key, "") or "").strip()
    except Exception:  # a malformed optional field must not lose the object
        return ""


def damage(ds, syntax: str) -> str:
    """Why a received object cannot be a radiograph to score ('' when it looks whole): no pixel data, no
    size, or uncompressed pixel data shorter than its header says (a transfer cut short)."""
    if "PixelData" not in ds:
        return "the object has no pixel data (not an image)"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"the image size fields are missing or malformed ({exc})"
    if syntax in UNCOMPRESSED:
        expected = rows * cols * samples * frames * bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            return (f"the pixel data is truncated: {actual} bytes where {rows}x{cols} pixels of {bits} bits "
                    f"need {expected}")
    return ""


class Receiver:
    """The handlers, bound to one spool and its limits."""

    def __init__(self, spool: Spool, allowed: list[str], spool_limit_bytes: int, wake: threading.Event | None = None):
        self.spool, self.allowed, self.limit = spool, allowed, spool_limit_bytes
        self.wake = wake or threading.Event()
        self._lock = threading.Lock()  # spool-size check and write, one C-STORE at a time
        self.used = spool.used_bytes()
        self.stores: dict[int, int] = {}  # C-STOREs per open association

    def refuse(self, calling_ae: str, sop_uid: str, reason: str) -> None:
        LOG.warning("refused%s from %s: %s", f" {sop_uid}" if sop_uid else "", calling_ae or "?", reason)
        try:
            self.spool.refuse(calling_ae, sop_uid, reason)
        except Exception as exc:  # the log line stays even when the queue cannot be written
            LOG.error("could not record the refusal in the queue: %s", exc)

    def on_echo(self, event) -> int:
        LOG.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def on_rejected(self, event) -> None:
        calling = event.assoc.requestor.ae_title
        if calling not in self.allowed:
            reason = f"unknown calling AE title {calling!r} (allowed: {', '.join(self.allowed)}); association rejected"
        else:
            reason = (f"association limit reached ({event.assoc.ae.maximum_associations} at once); "
                      "association rejected (transient): send again later")
        self.refuse(calling, "", reason)

    def on_accepted(self, event) -> None:
        assoc = event.assoc
        self.stores[id(assoc)] = 0
        LOG.info("association from %s (%s:%s)", assoc.requestor.ae_title, assoc.requestor.address,
                 assoc.requestor.port)

    def on_released(self, event) -> None:
        self._ended(event.assoc, aborted=False)

    def on_aborted(self, event) -> None:
        self._ended(event.assoc, aborted=True)

    def _ended(self, assoc, aborted: bool) -> None:
        """A sender that stored nothing and had contexts refused gets one refusal naming what it offered
        (senders such as storescu offer every class they know, so a refused context alone says nothing);
        an abort is recorded as such."""
        stored = self.stores.pop(id(assoc), 0)
        refused = [c for c in assoc.rejected_contexts if str(c.abstract_syntax) != VERIFICATION]
        classes = sorted({str(c.abstract_syntax) for c in refused if c.result == 0x03})
        syntaxes = sorted({str(t) for c in refused if c.result == 0x04 for t in c.transfer_syntax})
        parts = []
        if not stored and classes:
            parts.append(f"SOP class not supported ({', '.join(classes[:4])}{' ...' if len(classes) > 4 else ''}; "
                         "the node stores CR, DX and Secondary Capture images)")
        if not stored and syntaxes:
            parts.append(f"transfer syntax not supported ({', '.join(syntaxes[:4])}; the node decodes uncompressed, "
                         "JPEG, JPEG-LS, JPEG 2000 and RLE)")
        if parts:
            self.refuse(assoc.requestor.ae_title, "", "nothing stored: " + "; ".join(parts))
        if aborted:
            self.refuse(assoc.requestor.ae_title, "", "the sender aborted the association (a transfer cut short: "
                                                      "objects it had not seen acknowledged were not kept)")

    def on_store(self, event):
        """Spool the object atomically, queue it durably, then answer; nothing else happens here."""
        import pydicom

        request = event.request
        calling = event.assoc.requestor.ae_title
        sop_uid = str(request.AffectedSOPInstanceUID)
        syntax = str(event.context.transfer_syntax)
        self.stores[id(event.assoc)] = self.stores.get(id(event.assoc), 0) + 1
        try:
            if self.spool.has(sop_uid):
                LOG.info("%s from %s: already received, acknowledged again (one result per SOP Instance UID)",
                         sop_uid, calling)
                return SUCCESS
            data = event.encoded_dataset()  # the object as a Part 10 file, without decoding it
            try:
                ds = pydicom.dcmread(io.BytesIO(data))
                ds.PixelData  # noqa: B018 (parsing reaches the end of the object: a cut shows here)
            except Exception as exc:
                return self._status(CANNOT_UNDERSTAND, calling, sop_uid,
                                    f"the object cannot be parsed ({' '.join(str(exc).split())[:200]})")
            if str(ds.get("SOPInstanceUID", "")) != sop_uid:
                return self._status(DOES_NOT_MATCH, calling, sop_uid,
                                    "the object's SOP Instance UID differs from the C-STORE request's")
            if not _text(ds, "StudyInstanceUID"):
                return self._status(DOES_NOT_MATCH, calling, sop_uid, "the object has no Study Instance UID")
            why = damage(ds, syntax)
            if why:
                return self._status(DOES_NOT_MATCH, calling, sop_uid, why)
            with self._lock:
                if self.used + len(data) > self.limit:
                    self.used = self.spool.used_bytes()  # delivered results may have been cleaned
                if self.used + len(data) > self.limit:
                    return self._status(OUT_OF_RESOURCES, calling, sop_uid,
                                        f"spool full ({self.used / 1e6:.3g} MB of {self.limit / 1e6:.3g} MB waiting "
                                        "to be scored or delivered); send again later")
                atomic_write_bytes(self.spool.inbox_path(sop_uid), data)
                self.used += len(data)
            item = Received(sop_uid, calling, str(request.AffectedSOPClassUID), syntax, _text(ds, "StudyInstanceUID"),
                            _text(ds, "PatientName"), _text(ds, "PatientID"), _text(ds, "AccessionNumber"),
                            _text(ds, "StudyDate"))
            self.spool.add(item, len(data), sha256_bytes(data))
        except Exception as exc:  # the disk or the queue failed: the sender must keep the object
            return self._status(OUT_OF_RESOURCES, calling, sop_uid, f"the node could not store the object: {exc}")
        LOG.info("received %s from %s (%d bytes)", sop_uid, calling, len(data))
        self.wake.set()
        return SUCCESS

    def _status(self, code: int, calling: str, sop_uid: str, reason: str):
        from pydicom.dataset import Dataset

        self.refuse(calling, sop_uid, reason)
        status = Dataset()
        status.Status = code
        status.ErrorComment = reason[:64]  # LO: the sender's log shows why
        return status


def make_ae(ae_title: str, receiver: Receiver, max_associations: int):
    """The acceptor (a pynetdicom ``AE``): Verification and the radiograph storage classes, the allowed
    callers only."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.require_calling_aet = receiver.allowed
    ae.maximum_pdu_size = 0  # no limit on what the sender may send per PDU
    ae.add_supported_context(VERIFICATION)
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    return ae


def handlers(receiver: Receiver) -> list:
    from pynetdicom import evt

    return [(evt.EVT_C_ECHO, receiver.on_echo), (evt.EVT_C_STORE, receiver.on_store),
            (evt.EVT_REJECTED, receiver.on_rejected), (evt.EVT_ACCEPTED, receiver.on_accepted),
            (evt.EVT_ABORTED, receiver.on_aborted), (evt.EVT_RELEASED, receiver.on_released)]
