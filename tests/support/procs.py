"""Small helpers shared by the test fixtures that start real servers (SeaweedFS, MLflow)."""
from __future__ import annotations

import urllib.request
from pathlib import Path


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200 (never through an HTTP(S)_PROXY: the servers are on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def log_tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
