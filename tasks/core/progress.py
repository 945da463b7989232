"""The one progress helper: a bar with rate and ETA on a terminal, nothing in logs, and a one-line summary always.

``progress(...)`` is a tqdm bar drawn on stderr only when a person is watching: stderr is a terminal, this is
rank 0 of a torchrun launch, and the environment is not CI. ``KEEL_PROGRESS=0`` turns it off, ``KEEL_PROGRESS=1``
on (also in CI or through a pipe; never on a rank other than 0). Quiet, it is a no-op stand-in with the same
methods, so a stage's loop reads the same either way and tqdm is not even imported.

``summary(...)`` prints the stage's last line to stderr whatever the terminal, e.g.
``keel ingest: 1797 items, 3 rejects (unreadable 2, too_small 1), 4.1 s``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Self


def enabled() -> bool:
    """Whether a bar is drawn now (see the module docstring for the rules)."""
    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    forced = os.environ.get("KEEL_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without one, or closed
        return False


class _Quiet:
    """What ``progress`` returns when no bar is drawn: iterates, counts, draws nothing."""

    def __init__(self, iterable: Iterable | None, total: int | None, initial: int):
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.n += 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
             unit: str = "item", leave: bool = True):
    """A bar over ``iterable`` (or updated by hand with ``.update(n)``), usable as a context manager; ``total``
    defaults to ``len(iterable)`` where it has one; ``initial``: already done (a resume), not counted in the rate.
    ``.set_postfix(loss=...)`` adds values after the rate."""
    if not enabled():
        return _Quiet(iterable, total, initial)
    from tqdm import tqdm

    # mininterval: a redraw at most 5 times a second, so a fast loop does not pay for its own bar
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=sys.stderr, mininterval=0.2,
                dynamic_ncols=True, disable=False)


def summary_line(stage: str, items: int, rejects: dict[str, int] | None, seconds: float,
                 unit: str = "items", rejects_word: str = "rejects") -> str:
    """``keel <stage>: <items> <unit>, <n> <rejects_word> (<reason> <count>, ...), <seconds> s``; reasons with
    the most first; no parenthesis when there are none."""
    counted = {r: c for r, c in (rejects or {}).items() if c}
    line = f"keel {stage}: {items} {unit}"
    if rejects is not None:
        why = ", ".join(f"{r} {c}" for r, c in sorted(counted.items(), key=lambda rc: (-rc[1], rc[0])))
        line += f", {sum(counted.values())} {rejects_word}" + (f" ({why})" if why else "")
    return line + f", {seconds:.1f} s"


def summary(stage: str, items: int, rejects: dict[str, int] | None, seconds: float, unit: str = "items",
            rejects_word: str = "rejects") -> str:
    """Print the stage's one-line summary to stderr (always, bar or not) and return it."""
    line = summary_line(stage, items, rejects, seconds, unit, rejects_word)
    print(line, file=sys.stderr, flush=True)
    return line
