"""Secrets never reach an output: one redaction used by every writer of params, tags, events and checkpoints.

``redact_uri`` removes a URI's password (``http://user:secret@host`` -> ``http://user:***@host``) and the values
of query parameters that carry credentials (``?token=...``, ``X-Amz-Signature=...``).  ``redact`` applies that to
every URI inside a string, also replaces the value of any credential environment variable set in this process
(``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ...) wherever it appears, and walks dicts, lists and
tuples.  The values are read when called, never cached.
"""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

MASK = "***"
# environment variables whose value is a credential (the standard names of the clients keel uses)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "DATABRICKS_TOKEN",
              "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS_JSON", "PGPASSWORD")
_SECRET_QUERY = re.compile(r"(token|secret|password|passwd|signature|credential|key|auth|sig)$", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_MIN_SECRET = 6  # shorter env values ("", "x") would mask ordinary text


def redact_uri(uri: str) -> str:
    try:
        p = urlparse(uri)
        password = p.password
    except ValueError:  # not parseable as a URI: leave it to the env-value pass
        return uri
    netloc = p.netloc
    if password is not None:
        host = p.hostname or ""
        netloc = f"{p.username}:{MASK}@{host}" + (f":{p.port}" if p.port else "")
    query = p.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    if netloc == p.netloc and query == p.query:
        return uri
    return urlunparse(p._replace(netloc=netloc, query=query))


def _env_secrets() -> list[str]:
    vals = [os.environ.get(k, "") for k in SECRET_ENV]
    return sorted({v for v in vals if len(v) >= _MIN_SECRET}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    out = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    for s in _env_secrets() if secrets is None else secrets:
        out = out.replace(s, MASK)
    return out


def redact(value: Any) -> Any:
    """``value`` with every secret masked: strings, and the strings inside dicts (keys too), lists and tuples."""
    secrets = _env_secrets()

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redact_text(v, secrets)
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, tuple):  # a plain tuple (a namedtuple's constructor takes fields, not an iterable)
            return tuple(walk(x) for x in v)
        return v

    return walk(value)
