"""UTC time in the product's records: one owner for the formats every card, marker, site setting, audit
line and folder name uses."""
from __future__ import annotations

import time
from datetime import datetime, timezone


def utc_now() -> str:
    """Now as ISO 8601 UTC to the second, e.g. ``2026-12-02T07:05:00Z`` (cards, markers, site settings)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def utc_now_ms() -> str:
    """Now as ISO 8601 UTC to the millisecond with offset, e.g. ``2026-12-02T07:05:00.123+00:00`` (audit lines)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def utc_stamp() -> str:
    """Now as a sortable folder-name stamp in UTC, e.g. ``20261202-070500`` (versions, runs, jobs)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
