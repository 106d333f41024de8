"""The DICOM node as one process: the receiving AE (``scp``), a scoring thread and a delivery thread
(``worker``), around one spool (``spool``). ``python -m xray node`` runs ``run``.

Settings come from the command line, else ``XRAY_NODE_*`` (``xray.settings``). The log goes to
stderr and to ``<spool>/node.log``: every refusal, delivery failure and result with its reason.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from xray import settings
from xray.model.registry import ModelFileError
from xray.node import scp, worker
from xray.node.spool import Spool
from xray.node.worker import Destination

LOG = logging.getLogger("xray.node")
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: 16 characters of the default repertoire, no '\'
SCORE_BATCH = 16


@dataclass
class NodeConfig:
    """One node's settings (see ``xray.settings`` for the environment variables and defaults)."""

    ae_title: str
    port: int
    destination: Destination
    allowed: list[str] = field(default_factory=list)  # calling AE titles accepted; empty: the destination's
    host: str = "0.0.0.0"
    spool: Path | None = None
    max_associations: int = 4
    spool_mb: float = 2048.0
    keep_hours: float = 24.0
    retry_max_s: float = 300.0
    registry: str | None = None

    def __post_init__(self):
        self.allowed = self.allowed or [self.destination.ae_title]
        for title in [self.ae_title, self.destination.ae_title, *self.allowed]:
            check_ae_title(title)
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port}: must lie between 1 and 65535")
        if self.max_associations < 1 or self.spool_mb <= 0 or self.keep_hours < 0 or self.retry_max_s < 2:
            raise ValueError("max associations >= 1, spool size > 0, keep hours >= 0 and retry max >= 2 s")
        self.spool = Path(self.spool) if self.spool else settings.node_spool_path()


def check_ae_title(title: str) -> str:
    if not AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"AE title {title!r}: 1 to 16 printable characters, no backslash (PS3.5 6.2)")
    return title


def parse_destination(text: str) -> Destination:
    """'AET@HOST:PORT' -> Destination. Raises ValueError with the expected form."""
    match = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", text.strip())
    if not match:
        raise ValueError(f"destination {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    return Destination(check_ae_title(match.group(1)), match.group(2), int(match.group(3)))


def env_defaults() -> dict:
    """The XRAY_NODE_* settings that are set, as NodeConfig arguments (strings parsed here)."""
    out: dict = {}
    text = {k: settings.node_setting(k) for k in ("ae_title", "port", "host", "destination", "allow",
                                                  "max_associations", "spool_mb", "keep_hours", "retry_max_s")}
    if text["ae_title"]:
        out["ae_title"] = text["ae_title"]
    if text["host"]:
        out["host"] = text["host"]
    if text["destination"]:
        out["destination"] = parse_destination(text["destination"])
    if text["allow"]:
        out["allowed"] = [t.strip() for t in text["allow"].split(",") if t.strip()]
    for key, kind in (("port", int), ("max_associations", int), ("spool_mb", float), ("keep_hours", float),
                      ("retry_max_s", float)):
        if text[key]:
            try:
                out[key] = kind(text[key])
            except ValueError:
                raise ValueError(f"XRAY_NODE_{key.upper()}={text[key]!r} is not a number") from None
    if settings.node_setting("spool"):
        out["spool"] = settings.node_spool_path()
    return out


def setup_logging(spool: Path) -> None:
    spool.mkdir(parents=True, exist_ok=True)
    form = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    LOG.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(), logging.FileHandler(spool / "node.log")):
        handler.setFormatter(form)
        LOG.addHandler(handler)


class Node:
    """The running node: ``start``, then ``stop`` (or ``serve_forever`` until a stop event)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.spool = Spool(config.spool)
        self.stopping = threading.Event()
        self.work = threading.Event()  # a film arrived: score now
        self.scored = threading.Event()  # results are ready: deliver now
        self.models = worker.Models(config.registry)
        self.receiver = scp.Receiver(self.spool, config.allowed, int(config.spool_mb * 1e6), self.work)
        self.server = None
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        c = self.config
        for orphan in self.spool.orphans():  # never acknowledged: the sender sends them again
            LOG.info("removing %s: written by a handler that never acknowledged it", orphan.name)
            orphan.unlink(missing_ok=True)
        self.models.current()  # fail early, before accepting films, when there is no model at all
        ae = scp.make_ae(c.ae_title, self.receiver, c.max_associations)
        self.server = ae.start_server((c.host, c.port), block=False, evt_handlers=scp.handlers(self.receiver))
        self.threads = [threading.Thread(target=self._scoring, name="xray-node-score", daemon=True),
                        threading.Thread(target=self._delivering, name="xray-node-deliver", daemon=True)]
        for thread in self.threads:
            thread.start()
        LOG.info("node %s listening on %s:%d; results to %s; accepts calls from %s; spool %s (%.0f MB)",
                 c.ae_title, c.host, c.port, c.destination, ", ".join(c.allowed), c.spool, c.spool_mb)

    def stop(self) -> None:
        self.stopping.set()
        self.work.set()
        self.scored.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=60)

    def _scoring(self) -> None:
        while not self.stopping.is_set():
            self.work.clear()
            try:
                rows = self.spool.to_score(SCORE_BATCH)
                if rows:
                    model = self.models.current()
                    worker.score(model, self.spool, rows, self.models.prevalence_in_force(model))
                    self.scored.set()
                    continue
            except ModelFileError as exc:
                LOG.error("no model can score the queued films (they wait in the queue): %s", exc)
                self.stopping.wait(30)
            except Exception:  # the thread must outlive any one bad batch; the films stay queued
                LOG.exception("scoring failed; trying again")
                self.stopping.wait(5)
            self.work.wait(1.0)

    def _delivering(self) -> None:
        c = self.config
        while not self.stopping.is_set():
            self.scored.clear()
            try:
                rows = self.spool.to_deliver()
                delivered = worker.deliver(self.spool, rows, c.ae_title, c.destination, c.retry_max_s,
                                           c.keep_hours * 3600) if rows else 0
                worker.clean(self.spool, c.keep_hours * 3600)
                if delivered:
                    continue
            except Exception:
                LOG.exception("delivery failed; trying again")
                self.stopping.wait(5)
            self.scored.wait(1.0)
