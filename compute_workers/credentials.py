"""What a compute host proves and to whom: its broker password, its signed reports, and where its
service token may go. Pure standard library; both the control plane and the workers import it.

Broker
    Redis requires a password (``requirepass``, set by ``tools/services.sh``). Every Redis URL of the
    product, the tools and the tests is made by :func:`redis_url` from ONE password:
    :func:`redis_password` (``REDIS_PASSWORD``, else the file ``<state dir>/redis.password`` that
    ``tools/services.sh`` generates). A URL that already names a password keeps it.

Reports
    Every ``conductor.*`` report a worker sends is signed with its host's key: HMAC-SHA256 over the
    task name, the host, a timestamp and the canonical JSON of the keyword arguments, carried in the
    Celery message headers :data:`HOST_HEADER`, :data:`TIMESTAMP_HEADER` and :data:`SIGNATURE_HEADER`.
    A host key is ``HMAC(CLOUDCTL_HOST_KEY_SECRET, "host:<name>:<generation>")``: the control plane
    derives it again from its secret and the generation stored on the Host row (``manage.py
    host_credentials`` issues it, ``--rotate`` bumps the generation and so revokes the old key).

    Why not Celery's ``auth`` serializer (message signing with X.509 certificates): it checks a
    message against one store of trusted certificates and hands the task only the payload, so the
    conductor never learns *which* signer sent a report and cannot bind a report to the host it
    speaks for; any host's certificate would sign any other host's reports. It also replaces the JSON
    serializer for every task of the app, scheduler tasks included. Per-host HMAC keys (Python's
    :mod:`hmac`) bind each report to one host and leave everything else unchanged.

Service token
    Compute workers present ``CLOUDCTL_SERVICE_TOKEN`` to the image API only: :func:`check_api_url`
    refuses, before any connection, a URL (from a message) that is not under the configured API URL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

# --- broker ---------------------------------------------------------------------------------------

REDIS_PASSWORD_ENV = "REDIS_PASSWORD"
REDIS_PASSWORD_FILE = "redis.password"  # in the state dir (CLOUDCTL_STATE_DIR, default var/)
_REDIS_SCHEMES = ("redis", "rediss")


def redis_password(environ: Mapping[str, str], state_dir: Path) -> str:
    """``REDIS_PASSWORD`` when set, else the content of ``state_dir/redis.password`` (written by
    ``tools/services.sh``), else "" (a Redis without a password)."""
    configured = (environ.get(REDIS_PASSWORD_ENV) or "").strip()
    if configured:
        return configured
    try:
        return (state_dir / REDIS_PASSWORD_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return ""


def redis_url(url: str, password: str) -> str:
    """``url`` with ``password`` in it (``redis://:<password>@host:port/db``), when it is a Redis URL
    that names no password of its own; any other URL (or no password) is returned as it is."""
    parts = urlsplit(url)
    if not password or parts.scheme not in _REDIS_SCHEMES or parts.password is not None:
        return url
    user = quote(parts.username, safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


# --- signed reports -------------------------------------------------------------------------------

HOST_HEADER = "cloudctl_host"
TIMESTAMP_HEADER = "cloudctl_ts"
SIGNATURE_HEADER = "cloudctl_sig"
# A report signed more than this many seconds before (or after) the conductor's clock is refused.
DEFAULT_MAX_SKEW = 300.0
FIRST_GENERATION = 1


class ReportRejected(Exception):
    """A report whose signature does not prove where it comes from; the message is the reason."""


def host_key(secret: str, host: str, generation: int) -> str:
    """The key of ``host`` at ``generation`` (hex): ``HMAC-SHA256(secret, "host:<host>:<generation>")``."""
    if not secret:
        raise ValueError("no host key secret (CLOUDCTL_HOST_KEY_SECRET) to derive a host key from")
    message = f"host:{host}:{generation}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def canonical(task_name: str, host: str, timestamp: str, kwargs: Mapping[str, Any]) -> bytes:
    """The bytes a report's signature covers. JSON with sorted keys and no spaces: the same after the
    message went through the broker's JSON (tuples become lists, which encode the same; kombu gives
    back a UUID or a datetime as such, and both sides write it as its ``str``)."""
    return json.dumps([task_name, host, timestamp, kwargs], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True, default=str).encode()


def signature(key: str, task_name: str, host: str, timestamp: str, kwargs: Mapping[str, Any]) -> str:
    return hmac.new(key.encode(), canonical(task_name, host, timestamp, kwargs), hashlib.sha256).hexdigest()


def sign(key: str, task_name: str, host: str, kwargs: Mapping[str, Any],
         now: Callable[[], float] = time.time) -> dict[str, str]:
    """The message headers of report ``task_name`` from ``host`` with ``kwargs``, signed with ``key``."""
    timestamp = f"{now():.3f}"
    return {HOST_HEADER: host, TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(key, task_name, host, timestamp, kwargs)}


def verify(headers: Mapping[str, Any], task_name: str, kwargs: Mapping[str, Any],
           key_of: Callable[[str], str | None], *, max_skew: float = DEFAULT_MAX_SKEW,
           now: Callable[[], float] = time.time) -> str:
    """The host a report comes from, proven by its headers; raises :class:`ReportRejected` with the
    reason when they prove nothing: a header missing, a timestamp outside ``now ± max_skew``, a
    ``host`` argument that is not the signer, an unknown host (``key_of`` returns None) or a signature
    that is not the one the host's key makes."""
    host, timestamp, sig = (headers.get(name) for name in (HOST_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not isinstance(host, str) or not isinstance(timestamp, str) or not isinstance(sig, str) or \
            not host or not sig:
        raise ReportRejected("unsigned (no cloudctl_host/cloudctl_ts/cloudctl_sig headers)")
    try:
        sent = float(timestamp)
    except ValueError:
        raise ReportRejected(f"timestamp {timestamp[:40]!r} is not a number") from None
    skew = now() - sent
    if not math.isfinite(skew) or abs(skew) > max_skew:
        raise ReportRejected(f"timestamp {timestamp[:40]} is {skew:.0f} s from the conductor's clock "
                             f"(at most {max_skew:.0f} s allowed): a replay or a wrong clock")
    named = kwargs.get("host")
    if named != host:
        raise ReportRejected(f"signed by host {host!r} but speaks for host {named!r}")
    key = key_of(host)
    if key is None:
        raise ReportRejected(f"no key for host {host!r}")
    if not hmac.compare_digest(sig, signature(key, task_name, host, timestamp, kwargs)):
        raise ReportRejected(f"bad signature for host {host!r} (wrong or revoked host key)")
    return host


# --- the service token's destination --------------------------------------------------------------

class UntrustedURL(ValueError):
    """A URL the service token must not be sent to."""


def _origin(url: str) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, path) of ``url``; None when its port is no number."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None
    return scheme, (parts.hostname or "").lower(), port, parts.path


def check_api_url(url: Any, api_url: str, what: str = "URL") -> str:
    """``url`` when it is under ``api_url`` (same scheme, host and port, a path below its path, no
    user name, no ``..``); else :class:`UntrustedURL`, saying both. No request is made either way."""
    if not isinstance(url, str) or not url:
        raise UntrustedURL(f"{what} {url!r} is not a URL")
    origin, api = _origin(url), _origin(api_url)
    segments = urlsplit(url).path.split("/")
    if origin is None or api is None or origin[:3] != api[:3] or \
            not origin[3].startswith(api[3].rstrip("/") + "/") or urlsplit(url).username is not None or \
            ".." in segments or "." in segments:
        raise UntrustedURL(f"{what} {url} is not under the configured API URL {api_url} "
                           "(CLOUDCTL_API_URL): refused, the service token is sent nowhere else")
    return url
