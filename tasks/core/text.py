"""How keel shows results to a person: one number formatter, one aligned table, one PNG writer (atomic)."""
from __future__ import annotations

import io as _bytes_io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core import io


def fmt(v: Any, spec: str = ".4f", none: str = "-") -> str:
    """A value for a table cell: ``none`` for None, booleans lower case, floats with ``spec`` (``.4f``, ``.3g``),
    lists as their length (a curve is not a cell), anything else as ``str``."""
    if v is None:
        return none
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, list):
        return f"[{len(v)} points]"
    return str(v)


def table(rows: Sequence[Sequence[Any]], indent: str = "  ", gap: str = "  ", ragged_last: bool = True,
          align: str = "") -> list[str]:
    """Rows (the first is the header) as aligned lines. ``align`` gives one character per column, ``<`` (the
    default) or ``>`` (numbers read better right-aligned); the last column is not padded when ``ragged_last`` and
    left-aligned (it is often a long free-text 'what to do')."""
    cells = [[str(c) for c in r] for r in rows]
    ncols = max(len(r) for r in cells)
    widths = [max((len(r[i]) for r in cells if i < len(r)), default=0) for i in range(ncols)]

    def cell(i: int, c: str) -> str:
        if i < len(align) and align[i] == ">":
            return c.rjust(widths[i])
        return c if (ragged_last and i == ncols - 1) else c.ljust(widths[i])

    return [indent + gap.join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in cells]


def save_png(path: str | Path, fig, dpi: int = 100, **savefig) -> None:
    """Write a matplotlib figure as a PNG, atomically (a killed stage leaves no half image), then close it.
    PNG metadata carries no software version, so the same figure gives the same bytes."""
    import matplotlib.pyplot as plt

    buf = _bytes_io.BytesIO()
    savefig.setdefault("metadata", {"Software": None})
    fig.savefig(buf, format="png", dpi=dpi, **savefig)
    plt.close(fig)
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
