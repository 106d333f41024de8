"""Every setting read from the environment (``XRAY_*``), in one place.

| variable | meaning | default |
|---|---|---|
| XRAY_WEIGHTS | one folder as the whole model registry | the shipped ``weights/`` (read-only) plus ``<user data folder>/registry`` |
| XRAY_DATA_ROOTS | folders the Retrain page may read, ``os.pathsep``-separated | the home folder |
| XRAY_AUDIT_LOG | the audit log file; ``off`` disables it | ``<user data folder>/audit.jsonl`` |
| XRAY_CACHE | decoded-image cache folder | the platform's user cache folder |
| XRAY_DATA | the per-user data folder (audit log default) | the platform's user data folder |
| XRAY_ROLES | the site's roles file (TOML: who is clinician or administrator; README "Sign-in") | ``<user data folder>/roles.toml`` |
| XRAY_SIGN_IN_HOURS | how long a sign-in stays good before the page asks for a new one | 12 (one shift) |
| XRAY_ALLOW_UNAUTHENTICATED_NETWORK | ``1``: serve a non-loopback address without sign-in (logged; not recommended) | off |
| XRAY_NODE_AE_TITLE | the DICOM node's own AE title (``python -m xray node``) | ``XRAYAI`` |
| XRAY_NODE_PORT | the port the node listens on | 11112 |
| XRAY_NODE_HOST | the address the node listens on | ``0.0.0.0`` (every interface) |
| XRAY_NODE_DESTINATION | where results go, ``AET@HOST:PORT`` (the PACS) | none: the node needs one |
| XRAY_NODE_ALLOW | calling AE titles the node accepts, comma-separated | the destination's AE title |
| XRAY_NODE_SPOOL | the node's spool and queue folder | ``<user data folder>/node`` |
| XRAY_NODE_MAX_ASSOCIATIONS | concurrent associations the node accepts | 4 |
| XRAY_NODE_SPOOL_MB | the spool's size limit (received objects and results waiting for delivery) | 2048 |
| XRAY_NODE_KEEP_HOURS | how long a delivered film stays in the spool for the Worklist's detail view | 24 |

The user folders come from ``platformdirs`` (XDG on Linux, ``~/Library`` on macOS, ``%LOCALAPPDATA%``
on Windows), so nothing the app does at run time writes into the repository.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import platformdirs

APP_NAME = "xray-assistant"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the repository (or install) root
SHIPPED_REGISTRY = PACKAGE_ROOT / "weights"  # the versions that ship with the product
OFF_VALUES = ("off", "0", "false", "none")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def registry_path() -> Path:
    """The writable registry root: $XRAY_WEIGHTS, or the site registry in the user data folder."""
    return Path(_env("XRAY_WEIGHTS")) if registry_overridden() else site_registry_path()


def registry_overridden() -> bool:
    """True when $XRAY_WEIGHTS names the registry (then it is the whole registry, no shipped layer)."""
    return bool(_env("XRAY_WEIGHTS"))


def site_registry_path() -> Path:
    """The writable registry of this user: versions trained here, the active marker, site settings."""
    return user_data_dir() / "registry"


def user_data_dir() -> Path:
    """$XRAY_DATA, or the platform's per-user data folder (created by whoever writes into it)."""
    return Path(_env("XRAY_DATA") or platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """$XRAY_CACHE, or the platform's per-user cache folder."""
    return Path(_env("XRAY_CACHE") or platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def audit_log_path() -> Path | None:
    """$XRAY_AUDIT_LOG, ``<user data folder>/audit.jsonl`` when unset, None when set to ``off``."""
    value = _env("XRAY_AUDIT_LOG")
    if value.lower() in OFF_VALUES:
        return None
    return Path(value) if value else user_data_dir() / "audit.jsonl"


def node_setting(name: str) -> str:
    """$XRAY_NODE_<NAME> as given ('' when unset); ``xray.node`` parses and checks it."""
    return _env(f"XRAY_NODE_{name.upper()}")


def node_spool_path() -> Path:
    """$XRAY_NODE_SPOOL, or ``<user data folder>/node``: the DICOM node's spool and queue (and the Worklist's)."""
    return Path(node_setting("spool") or user_data_dir() / "node")


def data_roots() -> list[Path]:
    """Folders the Retrain page may read: $XRAY_DATA_ROOTS (``os.pathsep``-separated) or the home folder."""
    roots = [Path(p).expanduser() for p in _env("XRAY_DATA_ROOTS").split(os.pathsep) if p.strip()]
    return [r.resolve() for r in roots or [Path.home()]]


def data_roots_help() -> str:
    """How a user widens the data roots (shown with a refusal)."""
    sep = os.pathsep
    return (f"set XRAY_DATA_ROOTS to the allowed folders, separated by '{sep}' (e.g. "
            f"XRAY_DATA_ROOTS=/data/xrays{sep}/mnt/pacs-export), then restart the server")


def roles_path() -> Path:
    """$XRAY_ROLES, or ``<user data folder>/roles.toml``: the site's file mapping users and claims to roles."""
    value = _env("XRAY_ROLES")
    return Path(value).expanduser() if value else user_data_dir() / "roles.toml"


def read_roles() -> dict:
    """The roles file as a table (``{}`` when there is none); its meaning is ``xray.govern.identity``'s.

    Raises:
        ValueError: the file exists but cannot be read or is not valid TOML (the message names the file).
    """
    path = roles_path()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"the roles file {path} cannot be read: {exc}") from None


def sign_in_max_hours() -> float:
    """$XRAY_SIGN_IN_HOURS (default 12): a sign-in older than this is asked to be renewed.

    Raises:
        ValueError: not a positive number.
    """
    value = _env("XRAY_SIGN_IN_HOURS") or "12"
    try:
        hours = float(value)
    except ValueError:
        hours = float("nan")
    if not hours > 0:
        raise ValueError(f"XRAY_SIGN_IN_HOURS must be a positive number of hours, not {value!r}")
    return hours


def allow_unauthenticated_network() -> bool:
    """$XRAY_ALLOW_UNAUTHENTICATED_NETWORK set to 1/true/yes: the operator accepts serving a network
    address without sign-in (the app logs it at every start)."""
    return _env("XRAY_ALLOW_UNAUTHENTICATED_NETWORK").lower() in ("1", "true", "yes")
