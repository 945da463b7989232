"""One answer to "is this failure worth retrying?", shared by the registry calls (register) and the flow's
stage tasks (which see only a stage's stderr). Transient: the network, a throttling or overloaded server, a locked
SQLite database, an expired session token (a retry picks up refreshed
credentials). Anything else (a bug, bad input, a refused gate) is not retried: retrying it only hides it."""
from __future__ import annotations

import re

TRANSIENT = re.compile(
    r"connection refused|connection reset|connection aborted|broken pipe|timed out|timeout|"
    r"failed to establish a new connection|max retries exceeded|remotedisconnected|"
    r"temporary failure in name resolution|name or service not known|could not connect|"
    r"endpointconnectionerror|slow ?down|throttl|too many requests|service unavailable|internalerror|"
    r"(?:status|code|http|error)\D{0,3}(?:429|500|502|503|504)\b|\((?:429|500|502|503|504)\)|"
    r"too many (?:429|500|502|503|504) error responses|database is locked|expired ?token|token (?:has )?expired",
    re.IGNORECASE)


def transient_text(text: str) -> bool:
    """True when an error message (or the tail of a stage's stderr) names a transient failure."""
    return bool(TRANSIENT.search(text or ""))


def transient_cause(exc: BaseException) -> bool:
    """True when the exception or anything in its cause chain is a network error, by type alone (a message is
    not read: a wrapper that already gave up may quote the transient error it saw)."""
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with mlflow and boto3
        requests = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        if requests is not None and isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def transient_exception(exc: BaseException) -> bool:
    """True for network errors anywhere in the exception's cause chain, or a message that names one."""
    return transient_cause(exc) or transient_text(getattr(exc, "message", None) or str(exc))
