"""Who acts: the signed-in user or the machine's operator, with a role, and the check that every
governance action makes (``require``).

Roles:

- ``clinician``: Diagnose, the worklist, reports, the session's own threshold and prevalence.
- ``administrator``: all of that, plus retrain, activate (with or without an override) and roll back a
  version, calibrate to the site, adapt, save or restore the site's threshold and prevalence.

A signed-in user's role comes from the site's roles file (``settings.read_roles``; README "Sign-in"):
its ``[users]`` table names users by provider subject or verified e-mail; otherwise from a claim of the
ID token (``roles`` or ``groups`` unless the file's ``[claim]`` names another and maps its values). The
app passes the ID token's claims in as data (``st.user``); tokens themselves never come here.

Without sign-in (the app bound to loopback with no ``[auth]``, and the command line) the actor is the
machine's operator: the OS login, administrator, recorded as such in the audit log.
"""
from __future__ import annotations

import getpass
import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from xray import settings

CLINICIAN, ADMINISTRATOR = "clinician", "administrator"
ROLES = (CLINICIAN, ADMINISTRATOR)  # each role may do everything the ones before it may
DEFAULT_ROLE_CLAIMS = ("roles", "groups")  # claims read when the roles file names none
LOCAL = "local"  # the issuer recorded for the machine's operator (no identity provider)
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")
SIGN_IN_HELP = "README 'Sign-in'"


@dataclass(frozen=True)
class Actor:
    """A person acting through the app or the command line."""

    subject: str  # the provider's ``sub`` (unique within ``issuer``), or the OS login name
    email: str  # "" when the provider sent none (and for the operator)
    role: str  # one of ROLES
    issuer: str  # the provider's ``iss``, or ``local`` for the machine's operator
    name: str = ""

    @property
    def label(self) -> str:
        """How the person is named on the screen and in records (e-mail, else name, else subject)."""
        return self.email or self.name or self.subject

    @property
    def local(self) -> bool:
        return self.issuer == LOCAL

    def may(self, role: str) -> bool:
        """True when this actor holds ``role`` or a role above it."""
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)

    def audit_fields(self) -> dict[str, str]:
        """What every audit line records about who acted (no token, no cookie)."""
        return {"user": self.subject, "email": self.email, "role": self.role, "issuer": self.issuer}


class SignInError(ValueError):
    """No usable identity: not signed in, sign-in expired, no role, or a broken roles file."""


class NotPermitted(PermissionError):
    """The actor's role does not allow the action."""


def require(actor: Actor | None, role: str, action: str = "this action") -> Actor:
    """``actor`` when it holds ``role`` (or above); every governance entry point calls this first.

    Raises:
        NotPermitted: no actor, or one whose role is below ``role``.
        ValueError: ``role`` is not one of ROLES.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    if not isinstance(actor, Actor):
        raise NotPermitted(f"{action} needs a signed-in {role}, and nobody is signed in")
    if not actor.may(role):
        raise NotPermitted(f"{actor.label} is signed in as {_article(actor.role)} {actor.role}: {action} needs "
                           f"{_article(role)} {role}. Ask a site administrator for that role ({SIGN_IN_HELP})")
    return actor


def operator() -> Actor:
    """The machine's operator: the OS login, administrator (local mode and the command line)."""
    try:
        login = getpass.getuser()
    except Exception:  # no login name (containers): say so rather than invent one
        login = "unknown user"
    return Actor(subject=login, email="", role=ADMINISTRATOR, issuer=LOCAL, name=login)


def from_claims(claims: Mapping, roles: Mapping | None = None, now: float | None = None,
                max_hours: float | None = None) -> Actor:
    """The signed-in user named by an ID token's ``claims`` (``st.user``), with the role the site gives them.

    Args:
        claims: the ID token's claims (OpenID Connect Core 1.0 section 2) plus ``is_logged_in``.
        roles: the roles file's table (``settings.read_roles()`` when None).
        now: seconds since the epoch (the clock when None).
        max_hours: a sign-in older than this (``auth_time``, else ``iat``) has expired
            (``settings.sign_in_max_hours()`` when None).
    Raises:
        SignInError: not signed in, the sign-in has expired, it carries no subject or time, the roles file
            is broken, or the site gives this user no role. The message says what to do.
    """
    if not claims.get("is_logged_in"):
        raise SignInError("nobody is signed in: sign in with the hospital account")
    subject = str(claims.get("sub") or "").strip()
    if not subject:
        raise SignInError("the identity provider sent no subject (sub) for this sign-in: sign out and in again, "
                          "and if it persists ask IT to check the provider's configuration")
    issued = claims.get("auth_time") or claims.get("iat")
    try:
        issued = float(issued)
    except (TypeError, ValueError):
        raise SignInError("the sign-in carries no time (iat): sign out and sign in again") from None
    hours = settings.sign_in_max_hours() if max_hours is None else float(max_hours)
    age = (time.time() if now is None else now) - issued
    if age > hours * 3600:
        raise SignInError(f"your sign-in from {age / 3600:.0f} hours ago has expired (a sign-in lasts "
                          f"{hours:g} hours): sign in again")
    email = str(claims.get("email") or "").strip()
    actor = Actor(subject=subject, email=email, role="", issuer=str(claims.get("iss") or ""),
                  name=str(claims.get("name") or "").strip())
    role = role_for(claims, settings.read_roles() if roles is None else roles, actor.label)
    return Actor(subject, email, role, actor.issuer, actor.name)


def role_for(claims: Mapping, table: Mapping, who: str = "") -> str:
    """The role the site gives the user of ``claims``: the roles file's ``[users]`` entry for their subject
    or verified e-mail, else the highest role whose claim values they carry.

    Raises:
        SignInError: the table is malformed, or it and the claims give no known role.
    """
    path = settings.roles_path()
    users = table.get("users", {})
    claim = table.get("claim", {})
    if not isinstance(users, Mapping) or not isinstance(claim, Mapping):
        raise SignInError(f"the roles file {path} must hold [users] and [claim] tables ({SIGN_IN_HELP}); "
                          "ask a site administrator to correct it")
    for user, role in users.items():
        if role not in ROLES:
            raise SignInError(f"the roles file {path} gives {user!r} the unknown role {role!r} (the roles are "
                              f"{' and '.join(ROLES)}); ask a site administrator to correct it")
    by_key = {str(k).strip().lower(): v for k, v in users.items()}
    subject = str(claims.get("sub") or "").strip().lower()
    email = str(claims.get("email") or "").strip().lower() if claims.get("email_verified") is not False else ""
    for key in (subject, email):
        if key and key in by_key:
            return by_key[key]
    names = claim.get("name", DEFAULT_ROLE_CLAIMS)
    names = [names] if isinstance(names, str) else list(names)
    carried: set[str] = set()
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            carried.add(value)
        elif isinstance(value, (list, tuple)):
            carried.update(str(v) for v in value)
    for role in reversed(ROLES):  # the highest role carried
        accepted = claim.get(role, [role])
        accepted = {accepted} if isinstance(accepted, str) else {str(v) for v in accepted}
        if carried & accepted:
            return role
    seen = ", ".join(sorted(carried)[:5]) + (" ..." if len(carried) > 5 else "")
    detail = f" (its {'/'.join(names)} claim carries {seen})" if carried else ""
    raise SignInError(f"{who or 'this user'} is signed in, but this site gives them no role{detail}: ask a site "
                      f"administrator to add them to the roles file or to a role group ({SIGN_IN_HELP}), then "
                      "sign in again")


def is_loopback(address: str | None) -> bool:
    """True when a server bound to ``address`` is reachable from this machine only.

    An unset address is False: Streamlit then binds every interface. A host name other than localhost, or
    a unix socket (``unix://``, usually behind a reverse proxy), is served beyond this machine.
    """
    if not address:
        return False
    host = address.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serving_refusal(address: str | None, sign_in_configured: bool, allow_unauthenticated: bool) -> str | None:
    """The one line refusing to serve ``address`` without sign-in, or None when serving is allowed.

    Serving is allowed on loopback, with sign-in configured, or when the operator has accepted the risk
    (``settings.allow_unauthenticated_network``).
    """
    if sign_in_configured or is_loopback(address) or allow_unauthenticated:
        return None
    where = f"address {address}" if address else "every network interface (server.address is not set)"
    return (f"Refusing to serve {where} without sign-in: configure OpenID Connect in .streamlit/secrets.toml "
            f"[auth] ({SIGN_IN_HELP}), or bind to localhost (server.address = \"localhost\"), or set "
            "XRAY_ALLOW_UNAUTHENTICATED_NETWORK=1 to accept the risk.")


def provider_problem(metadata_url: str, timeout_s: float = 5.0) -> str | None:
    """None when the identity provider's discovery document (``server_metadata_url``) answers; otherwise
    what is wrong, in words for the sign-in page (OpenID Connect Discovery 1.0 section 4)."""
    host = urllib.parse.urlsplit(metadata_url).netloc or metadata_url
    try:
        with urllib.request.urlopen(metadata_url, timeout=timeout_s) as response:
            document = json.loads(response.read(1_000_000))
    except urllib.error.HTTPError as exc:
        return f"the sign-in service at {host} answers with an error (HTTP {exc.code})"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"the sign-in service at {host} does not answer ({reason})"
    if not isinstance(document, dict) or "authorization_endpoint" not in document:
        return f"the sign-in service at {host} answers, but not as an OpenID Connect provider"
    return None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
