"""``keel sweep``: the command; the search itself is the Prefect flow ``keel-sweep`` (flows/sweep.py), and its
declaration's checks are tasks.core.sweep. A sweep that cannot run or ends with no complete trial is a UserError
(``keel sweep: error: ...``, exit 1)."""
from __future__ import annotations

from typing import Any

from tasks.core.errors import DataError


def main(promote: bool = True, fresh: bool = False) -> dict[str, Any]:
    from flows import sweep
    from flows.errors import FlowError

    try:
        return sweep.main(promote=promote, fresh=fresh)
    except FlowError as exc:
        raise DataError(str(exc)) from None
